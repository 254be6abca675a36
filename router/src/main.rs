fn main() -> std::process::ExitCode {
    shardgate::cli::main()
}
