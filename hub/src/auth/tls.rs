//! The hub TLS identity (filled in by the TLS work).
