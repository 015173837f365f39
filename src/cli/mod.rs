//! The subcommands of the `qlora` binary that live in the library, each an `Args` struct parsed by
//! clap and a `run` function: `plan` (the device-memory plan of a training step).

pub mod plan;
