fn main() -> std::process::ExitCode {
    fhirlift::cli::main()
}
