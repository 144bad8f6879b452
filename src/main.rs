//! The `vipllava` command line.

mod cli;

/// mimalloc instead of the system allocator: glibc maps every buffer above 32 MB fresh from
/// the OS and unmaps it on free, so each widened weight of a bf16 prefill and each loaded
/// tensor paid first-touch page faults and zeroing (BENCHMARKS.md, history #10). Only the
/// binary sets it: library users keep their own allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::run()
}
