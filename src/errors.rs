//! The kernels' and wire readers' errors, in plain Rust (std only): the bindings map each
//! kind to its Python exception class in `crate::py::errors`.
use std::fmt;

/// What went wrong, with the argument and (when it concerns one) the row.
#[derive(Debug, Clone, PartialEq)]
pub enum KernelError {
    /// A value the caller passed is outside what the kernel accepts.
    Input {
        arg: &'static str,
        row: Option<usize>,
        msg: String,
    },
    /// An array has a dtype or layout that cannot be converted safely.
    Dtype { arg: &'static str, msg: String },
    /// A server's reply does not read as JSON (torn, or not JSON at all).
    Reply { msg: String },
    /// A server's reply is well formed but lacks what its request asked for.
    Incomplete { msg: String },
    /// A server's reply answers another request (a stray or duplicated reply).
    Mismatch { msg: String },
}

impl KernelError {
    pub fn input(arg: &'static str, row: Option<usize>, msg: impl Into<String>) -> Self {
        KernelError::Input {
            arg,
            row,
            msg: msg.into(),
        }
    }

    pub fn row(arg: &'static str, row: usize, msg: impl Into<String>) -> Self {
        Self::input(arg, Some(row), msg)
    }

    pub fn arg(arg: &'static str, msg: impl Into<String>) -> Self {
        Self::input(arg, None, msg)
    }
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::Input {
                arg,
                row: Some(row),
                msg,
            } => write!(f, "{arg}, row {row}: {msg}"),
            KernelError::Input { arg, row: None, msg } | KernelError::Dtype { arg, msg } => write!(f, "{arg}: {msg}"),
            KernelError::Reply { msg } | KernelError::Incomplete { msg } | KernelError::Mismatch { msg } => {
                f.write_str(msg)
            }
        }
    }
}

impl std::error::Error for KernelError {}

pub type KernelResult<T> = Result<T, KernelError>;
