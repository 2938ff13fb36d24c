// motley: one binary, one subcommand per job (SPEC section 6).
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "apps/subcommands.h"
#include "core/check.h"

namespace {

struct Subcommand {
  const char* name;
  const char* summary;
  int (*main)(int argc, char** argv);
};

constexpr Subcommand kSubcommands[] = {
    {"prepare", "text -> tokenizer.json, train.h5, valid.h5 (byte-level BPE)",
     motley::apps::prepare_main},
    {"train", "train a model from a JSON config", motley::apps::train_main},
    {"eval", "evaluate a checkpoint: loss, perplexity, bits per byte", motley::apps::eval_main},
    {"generate", "sample text from a checkpoint", motley::apps::generate_main},
    {"inspect", "summarise a checkpoint", motley::apps::inspect_main},
    {"route", "per-token loss and routing of a checkpoint -> HDF5 (analyses)", motley::apps::route_main},
    {"bench", "training-step and MoE-layer throughput of a config", motley::apps::bench_main},
    {"bench-kernels", "GEMM and fused-kernel throughput on this machine",
     motley::apps::bench_kernels_main},
};

void print_usage(std::FILE* out) {
  std::fprintf(out,
               "motley: training Mixture-of-Experts language models with experts of "
               "diverse sizes\n\n"
               "usage: motley <subcommand> [flags...]\n"
               "       motley <subcommand> --help\n\nsubcommands:\n");
  for (const Subcommand& s : kSubcommands) {
    std::fprintf(out, "  %-15s %s\n", s.name, s.summary);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") ||
      !std::strcmp(argv[1], "help")) {
    print_usage(stdout);
    return argc < 2 ? 2 : 0;
  }
  for (const Subcommand& s : kSubcommands) {
    if (std::strcmp(argv[1], s.name) != 0) continue;
    try {
      return s.main(argc - 1, argv + 1);
    } catch (const motley::Error& e) {
      std::fprintf(stderr, "motley %s: %s: %s\n", s.name, motley::error_kind_name(e.kind()),
                   e.what());
      return motley::exit_code_for(e.kind());
    } catch (const std::exception& e) {
      std::fprintf(stderr, "motley %s: internal error: %s\n", s.name, e.what());
      return 1;
    }
  }
  std::fprintf(stderr, "motley: unknown subcommand '%s'\n\n", argv[1]);
  print_usage(stderr);
  return 2;
}
