//! `trunkfarm`: the hub binary. Everything lives in the library; see `cli`.

fn main() -> std::process::ExitCode {
    trunkfarm::cli::main()
}
