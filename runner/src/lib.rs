//! Bit-Llama Lab runner: sweep files → runs → engine processes on free devices → SQLite.
//!
//! Modules: [`spec`] (sweep files, validation, expansion), [`store`] (the SQLite `RunStore`), [`ingest`]
//! (the single DB writer), [`exec`] (where runs execute: one `Executor` interface, the local and Slurm
//! backends behind it), [`display`] (the live view), [`report`] (tables), [`ui`] (the dashboard and the offline HTML report), [`cli`] (argument
//! parsing).

pub mod bench_sampler;
pub mod cli;
pub mod display;
pub mod early_stop;
pub mod exec;
pub mod ingest;
pub mod pack_points;
pub mod report;
pub mod spec;
pub mod store;
pub mod tpe;
pub mod ui;
