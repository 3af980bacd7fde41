//! The `custody` command line.
#![forbid(unsafe_code)]

mod cli;

// jemalloc, as Vector uses: under load glibc's malloc and free took a
// quarter of the writer's time and 78 -> 43 µs of CPU per request went with it; mimalloc
// was as fast but held 77 MiB at 1,000 connections where jemalloc holds 43 MiB
// (docs/benchmarks.md).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
