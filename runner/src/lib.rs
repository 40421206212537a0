//! Bit-Llama Lab runner: sweep files → runs → engine processes on free devices → SQLite.
//!
//! Modules: [`spec`] (sweep files, validation), [`search`] (the search space, grid/random/TPE sampling, early stopping, and the one `Search` the executors ask what to launch next), [`store`] (the SQLite `RunStore`), [`ingest`]
//! (the single DB writer), [`exec`] (where runs execute: one `Executor` interface, the local and Slurm
//! backends behind it), [`display`] (the live view), [`report`] (tables), [`ui`] (the dashboard and the offline HTML report), [`cli`] (argument
//! parsing).

pub mod bench_sampler;
pub mod cli;
pub mod display;
pub mod exec;
pub mod ingest;
pub mod pack_points;
pub mod report;
pub mod scaling;
pub mod search;
pub mod spec;
pub mod store;
pub mod ui;
