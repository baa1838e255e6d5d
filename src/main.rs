// The mapping stage makes many small, short-lived allocations on several threads at once;
// mimalloc's thread-local free lists serve them faster than the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    fhirlift::cli::main()
}
