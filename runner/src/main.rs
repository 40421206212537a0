//! `runner`: hyperparameter sweeps over Bit-Llama runs, tracked in SQLite.

fn main() -> std::process::ExitCode {
    runner::cli::main()
}
