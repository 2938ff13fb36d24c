// A small command-line parser for motley's subcommands.
//
// Abseil's flags are process-global and take the last value of a repeated
// flag, while motley's subcommands each have their own flags and `train`
// takes a repeatable `--set k=v` whose values may contain commas (JSON
// lists). So subcommands declare their flags here:
//
//   CommandLine cli("train", "Train a model.");
//   cli.flag("config", "FILE", "the JSON config (required)");
//   cli.repeated("set", "KEY=VALUE", "override a config key (repeatable)");
//   cli.parse(argc, argv);          // --help prints usage and exits 0
//   cli.get("config"); cli.all("set");
//
// Accepted forms: --name value, --name=value, and for switches --name;
// '_' may stand for '-' in a name (--vocab_size is --vocab-size). A list
// flag (prepare's --input) also takes the arguments after its value up to
// the next flag, and splits every value at commas. A value may not be
// another of the command's flags (`--out --seed 3` is an error, not an
// output folder named "--seed"). Unknown flags, missing values and stray
// positional arguments are kUsage errors (exit 2) naming the flag; the
// caller prefixes "motley <command>:" when it reports them.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace motley::apps {

class CommandLine {
 public:
  CommandLine(std::string command, std::string summary);

  void flag(const std::string& name, const std::string& value_name, const std::string& help,
            std::optional<std::string> default_value = std::nullopt);
  void repeated(const std::string& name, const std::string& value_name, const std::string& help);
  // Repeatable; `--name a,b c` gives a, b and c (see above).
  void list(const std::string& name, const std::string& value_name, const std::string& help);
  void switch_flag(const std::string& name, const std::string& help);
  // Positional arguments (e.g. inspect's PATH), in order.
  void positional(const std::string& name, const std::string& help);
  // Paragraphs printed after the flags in --help.
  void details(std::string text);

  // Parses argv[1..]; on --help prints usage to stdout and returns false
  // (the caller returns 0).
  bool parse(int argc, char** argv);

  bool has(const std::string& name) const;
  // The value (or the default); kUsage naming the flag when required and absent.
  std::string get(const std::string& name) const;
  std::string get_or(const std::string& name, const std::string& fallback) const;
  std::int64_t get_int(const std::string& name) const;
  // A seed or count in [0, 2^64): kUsage for a sign or anything else.
  std::uint64_t get_uint64(const std::string& name) const;
  double get_double(const std::string& name) const;
  bool get_switch(const std::string& name) const;
  std::vector<std::string> all(const std::string& name) const;

  // Summary, flags (help wrapped at 80 columns) and details.
  std::string usage() const;

 private:
  enum class Kind { kValue, kRepeated, kList, kSwitch, kPositional };
  struct Spec {
    std::string name, value_name, help;
    std::optional<std::string> default_value;
    Kind kind = Kind::kValue;
  };
  void add(Spec spec);
  const Spec* find(const std::string& name) const;
  bool names_a_flag(const std::string& arg) const;
  void store(const Spec& spec, const std::string& value);

  std::string command_, summary_, details_;
  std::vector<Spec> specs_;
  std::map<std::string, std::vector<std::string>> values_;
};

}  // namespace motley::apps
