//! Operator overloading for `Var`: `+ - * /` and unary `-` between variables (owned or borrowed) and
//! with Rust numbers on either side (a number becomes a 0-d constant of the variable's dtype).
//! Every operator records the caller's line, like the named methods.

use crate::var::{Operand, Var};
use kiln_ir::ops::{BinaryOp, UnaryOp};
use std::ops::{Add, Div, Mul, Neg, Sub};
use std::panic::Location;

macro_rules! binary_operator {
    ($tr:ident, $method:ident, $op:ident) => {
        impl<R: Operand> $tr<R> for &Var {
            type Output = Var;
            #[track_caller]
            fn $method(self, rhs: R) -> Var {
                self.binary(BinaryOp::$op, rhs)
            }
        }
        impl<R: Operand> $tr<R> for Var {
            type Output = Var;
            #[track_caller]
            fn $method(self, rhs: R) -> Var {
                (&self).binary(BinaryOp::$op, rhs)
            }
        }
        binary_operator!(@numbers $tr, $method, $op, f64, f32, i32, i64);
    };
    (@numbers $tr:ident, $method:ident, $op:ident, $($t:ty),*) => {$(
        impl $tr<&Var> for $t {
            type Output = Var;
            #[track_caller]
            fn $method(self, rhs: &Var) -> Var {
                let lhs = self.to_var(rhs, Location::caller());
                lhs.binary(BinaryOp::$op, rhs)
            }
        }
        impl $tr<Var> for $t {
            type Output = Var;
            #[track_caller]
            fn $method(self, rhs: Var) -> Var {
                let lhs = self.to_var(&rhs, Location::caller());
                lhs.binary(BinaryOp::$op, rhs)
            }
        }
    )*};
}
binary_operator!(Add, add, Add);
binary_operator!(Sub, sub, Sub);
binary_operator!(Mul, mul, Mul);
binary_operator!(Div, div, Div);

impl Neg for &Var {
    type Output = Var;
    #[track_caller]
    fn neg(self) -> Var {
        self.unary(UnaryOp::Neg)
    }
}
impl Neg for Var {
    type Output = Var;
    #[track_caller]
    fn neg(self) -> Var {
        self.unary(UnaryOp::Neg)
    }
}
