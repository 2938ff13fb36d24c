// Entry points of motley's subcommands. Each receives argv with the
// subcommand name as argv[0], parses its own flags, and returns the
// process exit code (SPEC section 6). motley::Error escaping from one is
// mapped to its exit code by main().
#pragma once

namespace motley::apps {

// motley bench-kernels: GEMM and fused-kernel throughput against the
// machine's BLAS and memory bandwidth.
int bench_kernels_main(int argc, char** argv);

// motley train / eval / generate / inspect (SPEC section 6).
int train_main(int argc, char** argv);
int eval_main(int argc, char** argv);
int generate_main(int argc, char** argv);
int inspect_main(int argc, char** argv);
// motley bench: training-step and MoE-layer throughput of a config.
int bench_main(int argc, char** argv);

// motley prepare: reads raw text, trains the byte-level BPE tokenizer and
// writes tokenizer.json, train.h5 and valid.h5 (SPEC sections 4 and 6).
int prepare_main(int argc, char** argv);

// motley route: per-token CE and routing of a checkpoint to HDF5 (analyses).
int route_main(int argc, char** argv);

}  // namespace motley::apps
