//! Model directories written atomically, never over the input: re-exported from
//! [`vipllava_convert::output`], which owns the one writer (convert, export, training).

pub use vipllava_convert::output::*;
