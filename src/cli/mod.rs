//! The subcommands of the `qlora` binary as library modules: each has its clap `Args` struct and
//! a `run` that returns the crate's typed errors (src/main.rs prints them and exits non-zero).

pub mod merge;
pub mod quantize;
