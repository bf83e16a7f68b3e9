//! The `ubsync` binary: everything lives in the library; see `ubsync::cli`.

fn main() -> std::process::ExitCode {
    ubsync::cli::main()
}
