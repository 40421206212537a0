//! Bit-Llama Lab runner: sweep files → runs → engine processes on free devices → SQLite.
//!
//! Modules: [`spec`] (sweep files, validation, expansion), [`store`] (the SQLite `RunStore`), [`ingest`]
//! (the single DB writer), [`scheduler`] (devices, processes, signals), [`slurm`] (the Slurm
//! backend: sbatch jobs, state polling, resubmission), [`report`] (tables and HTML),
//! [`cli`] (argument parsing).

pub mod cli;
pub mod ingest;
pub mod pack_points;
pub mod report;
pub mod scheduler;
pub mod slurm;
pub mod spec;
pub mod store;
