//! `engine`: train one Bit-Llama run (the process the runner launches; also usable alone).

fn main() -> std::process::ExitCode {
    engine::cli::run_from(std::env::args_os())
}
