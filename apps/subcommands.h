// Entry points of motley's subcommands. Each receives argv with the
// subcommand name as argv[0], parses its own flags, and returns the
// process exit code (SPEC section 6). motley::Error escaping from one is
// mapped to its exit code by main().
#pragma once

namespace motley::apps {

// motley bench-kernels: GEMM and fused-kernel throughput against the
// machine's BLAS and memory bandwidth.
int bench_kernels_main(int argc, char** argv);

}  // namespace motley::apps
