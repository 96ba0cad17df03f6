//! What `fit` returns: per epoch the mean training loss and metrics (weighted by batch size, as
//! Keras reports them), the validation scores, and the time taken. The loss curves can be drawn
//! as a PNG with plotters.

use super::model::Scores;
use kiln_ir::{Error, Result};
use std::path::Path;

#[derive(Clone, Debug, PartialEq)]
pub struct EpochLog {
    pub loss: f64,
    pub metrics: Vec<(String, f64)>,
    pub val: Option<Scores>,
    pub seconds: f64,
}

impl EpochLog {
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics.iter().find(|m| m.0 == name).map(|m| m.1)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct History {
    pub epochs: Vec<EpochLog>,
    pub metric_names: Vec<String>,
}

/// Fonts tried for the plot's text, in order (Debian's fonts-dejavu-core first).
const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn register_font() -> Result<()> {
    static FONT: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    FONT.get_or_init(|| {
        let path = FONTS.iter().find(|p| Path::new(p).is_file()).ok_or_else(|| {
            format!("no font for the plot's text (looked for {}; install fonts-dejavu-core)", FONTS.join(", "))
        })?;
        let bytes: &'static [u8] =
            Box::leak(std::fs::read(path).map_err(|e| format!("{path}: {e}"))?.into_boxed_slice());
        plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes)
            .map_err(|_| format!("{path} is not a usable font"))
    })
    .clone()
    .map_err(Error::Invalid)
}

impl History {
    /// Training loss per epoch.
    pub fn loss(&self) -> Vec<f64> {
        self.epochs.iter().map(|e| e.loss).collect()
    }
    /// Validation loss per epoch (where there was validation data).
    pub fn val_loss(&self) -> Vec<f64> {
        self.epochs.iter().filter_map(|e| e.val.as_ref().map(|v| v.loss)).collect()
    }

    /// Draws the training (and validation) loss per epoch as a PNG.
    pub fn plot(&self, path: &Path) -> Result<()> {
        use plotters::prelude::*;
        register_font()?;
        let fail = |e: &dyn std::fmt::Display| Error::Invalid(format!("plotting {}: {e}", path.display()));
        let (train, val) = (self.loss(), self.val_loss());
        let all = train.iter().chain(&val).copied().filter(|v| v.is_finite());
        let top = all.clone().fold(f64::MIN, f64::max).max(1e-9) * 1.05;
        let bottom = all.fold(f64::MAX, f64::min).min(top) * 0.95;
        let epochs = self.epochs.len().max(2) as f64;
        let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("loss per epoch", ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(1.0..epochs, bottom..top)
            .map_err(|e| fail(&e))?;
        chart.configure_mesh().x_desc("epoch").y_desc("loss").draw().map_err(|e| fail(&e))?;
        let series = |v: &[f64]| v.iter().enumerate().map(|(i, &l)| ((i + 1) as f64, l)).collect::<Vec<_>>();
        chart
            .draw_series(LineSeries::new(series(&train), BLUE.stroke_width(2)))
            .map_err(|e| fail(&e))?
            .label("training")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        if !val.is_empty() {
            chart
                .draw_series(LineSeries::new(series(&val), RED.stroke_width(2)))
                .map_err(|e| fail(&e))?
                .label("validation")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        }
        chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw().map_err(|e| fail(&e))?;
        root.present().map_err(|e| fail(&e))?;
        Ok(())
    }
}
