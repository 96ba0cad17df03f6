//! Tile tables (`KILN_CUDA_TILES`, `with_tile_table`): each product of a training step that a table
//! lists is computed as the table says (cuBLAS, kiln's estimate, or a tile shape and slice count by
//! FMAs or on tensor cores), the others as kiln would, and the step still computes the reference's
//! loss (on the CUDA emulator). The file named by `KILN_CUDA_TILES` is read and applied the same way.
//! (Every other test of this file sets a table on its thread, which outranks the environment's, so
//! setting the variable in one test leaves the others alone.)

use kiln::workloads::build;
use kiln::Device;
use kiln_codegen::cuda::{with_tile_table, ProductKey, TileChoice, TileTable};

/// The fmnist-mlp step's products that a table can direct, with a different choice for each.
fn fmnist_table() -> (Vec<(String, ProductKey)>, TileTable) {
    let w = build("fmnist-mlp", Device::Reference).unwrap();
    let products = w.step.cuda_products(&w.args).unwrap();
    let names: Vec<&str> = products.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["k0_matmul", "k2_matmul", "k17_matmul", "k19_matmul", "k25_matmul"]);
    let mut table = TileTable::default();
    for ((_, key), label) in products.iter().zip(["cuBLAS", "tc128x64/s3", "64x64/s2", "kiln", "32x32/s1"]) {
        table.insert(*key, TileChoice::from_label(label).unwrap()).unwrap();
    }
    (products, table)
}

/// The heading comment of the kernel that computes product `name` in `code`.
fn heading<'a>(code: &'a str, name: &str) -> &'a str {
    let needle = format!("computes the product of {name} ");
    code.lines().find(|l| l.contains(&needle)).unwrap_or_else(|| panic!("no kernel computes {name}:\n{code}"))
}

#[test]
fn a_table_directs_each_product_of_a_step() {
    let (_, table) = fmnist_table();
    let w = build("fmnist-mlp", Device::Reference).unwrap();
    let untuned = with_tile_table(TileTable::default(), || w.step.cuda_source(&w.args)).unwrap();
    let tuned = with_tile_table(table.clone(), || w.step.cuda_source(&w.args)).unwrap();
    assert!(tuned.contains("//   k0_matmul: cuBLAS 128x784 times 784x256\n"), "{tuned}");
    assert!(!untuned.contains("k0_matmul: cuBLAS"), "{untuned}");
    assert!(
        heading(&tuned, "k2_matmul")
            .ends_with("(128x256x256) in 128x64 tiles on tensor cores (3xTF32), its inner dim in 3 slices (no cuBLAS call), then its epilogue"),
        "{tuned}"
    );
    assert!(
        heading(&tuned, "k17_matmul").contains("(128x256x256) in 64x64 tiles, its inner dim in 2 slices"),
        "{tuned}"
    );
    // `kiln`: as without a table.
    assert_eq!(heading(&tuned, "k19_matmul"), heading(&untuned, "k19_matmul"));
    assert!(heading(&tuned, "k25_matmul").contains("(256x128x256) in 32x32 tiles (no cuBLAS call)"), "{tuned}");

    if let Some(why) = kiln::testing::emulator_skip_reason() {
        kiln::testing::note(&format!("the tuned step's run on the emulator skipped: {why}"));
        return;
    }
    let mut emulated = build("fmnist-mlp", Device::CudaEmulator).unwrap();
    let mut reference = build("fmnist-mlp", Device::Reference).unwrap();
    // (specialized, so tiled, at the first call)
    let a = with_tile_table(table, || emulated.step.call1(&emulated.args)).unwrap().item().unwrap();
    assert!(emulated.step.generated_code().contains("k0_matmul: cuBLAS"));
    let b = reference.step.call1(&reference.args).unwrap().item().unwrap();
    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "tuned fmnist-mlp: loss {a} vs reference {b}");
}

#[test]
fn a_table_lists_products_by_shape_and_layout() {
    // The same size in another layout is another product: k3's line (128x256x256 nn) does not
    // reach k19 (128x256x256 nt, its `b` stored transposed).
    let (products, _) = fmnist_table();
    let (k3, k19) = (products[1].1, products[2].1);
    assert_eq!((k3.m, k3.k, k3.n, k3.b_transposed), (k19.m, k19.k, k19.n, !k19.b_transposed));
    let mut table = TileTable::default();
    table.insert(k3, TileChoice::from_label("cuBLAS").unwrap()).unwrap();
    let w = build("fmnist-mlp", Device::Reference).unwrap();
    let code = with_tile_table(table, || w.step.cuda_source(&w.args)).unwrap();
    assert!(code.contains("//   k2_matmul: cuBLAS 128x256 times 256x256\n"), "{code}");
    assert!(heading(&code, "k17_matmul").contains("tiles"), "{code}");
}

#[test]
fn kiln_cuda_tiles_names_a_table_file() {
    let (_, table) = fmnist_table();
    let dir = std::env::temp_dir().join(format!("kiln-tile-table-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiles.txt");
    std::fs::write(&path, table.to_text("written by tests/cuda_tile_table.rs")).unwrap();
    // Read once, at the first compile that has no table of its own: this test's.
    std::env::set_var("KILN_CUDA_TILES", &path);
    let w = build("fmnist-mlp", Device::Reference).unwrap();
    let code = w.step.cuda_source(&w.args).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(code.contains("//   k0_matmul: cuBLAS 128x784 times 784x256\n"), "{code}");
    assert!(heading(&code, "k2_matmul").contains("in 128x64 tiles on tensor cores"), "{code}");
}
