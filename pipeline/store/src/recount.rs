//! Raw recount.
