//! The one place a `KernelError` becomes a Python exception: each kind raises its class
//! from `dualsample_rs.exceptions`, with the error's `Display` text as the message.
use pyo3::import_exception;
use pyo3::PyErr;

use crate::errors::KernelError;

import_exception!(dualsample_rs.exceptions, InvalidInputError);
import_exception!(dualsample_rs.exceptions, InvalidDtypeError);
import_exception!(dualsample_rs.exceptions, InvalidResponseError);
import_exception!(dualsample_rs.exceptions, MismatchedReplyError);
import_exception!(dualsample_rs.exceptions, IncompleteReplyError);

// `KernelError` is this crate's type, so the conversion may live beside the bindings
// and `?` turns a kernel's error into a `PyErr` anywhere in `crate::py`.
impl From<KernelError> for PyErr {
    fn from(err: KernelError) -> PyErr {
        let msg = err.to_string();
        match err {
            KernelError::Input { .. } => InvalidInputError::new_err(msg),
            KernelError::Dtype { .. } => InvalidDtypeError::new_err(msg),
            KernelError::Reply { .. } => InvalidResponseError::new_err(msg),
            KernelError::Mismatch { .. } => MismatchedReplyError::new_err(msg),
            KernelError::Incomplete { .. } => IncompleteReplyError::new_err(msg),
        }
    }
}
