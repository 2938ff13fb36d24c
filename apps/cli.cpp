#include "apps/cli.h"

#include <algorithm>
#include <cstdio>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/check.h"

namespace motley::apps {
namespace {

constexpr std::size_t kHelpColumn = 29;  // where a flag's help starts
constexpr std::size_t kWidth = 80;

// `text` word-wrapped into lines of at most kWidth columns (longer words
// stand alone), the first starting at column `column`, the rest indented
// to `indent`.
std::string wrap(const std::string& text, std::size_t column, std::size_t indent) {
  std::string out;
  bool line_empty = true;
  for (absl::string_view word : absl::StrSplit(text, ' ', absl::SkipEmpty())) {
    if (!line_empty && column + 1 + word.size() > kWidth) {
      absl::StrAppend(&out, "\n", std::string(indent, ' '));
      column = indent;
      line_empty = true;
    }
    if (!line_empty) {
      out += ' ';
      ++column;
    }
    absl::StrAppend(&out, word);
    column += word.size();
    line_empty = false;
  }
  return out;
}

std::string normalise(std::string name) {
  std::replace(name.begin(), name.end(), '_', '-');
  return name;
}

}  // namespace

CommandLine::CommandLine(std::string command, std::string summary)
    : command_(std::move(command)), summary_(std::move(summary)) {}

void CommandLine::add(Spec spec) {
  MOTLEY_CHECK(spec.kind == Kind::kPositional || find(spec.name) == nullptr, "flag --", spec.name,
               " declared twice");
  specs_.push_back(std::move(spec));
}

void CommandLine::flag(const std::string& name, const std::string& value_name,
                       const std::string& help, std::optional<std::string> default_value) {
  add({name, value_name, help, std::move(default_value), Kind::kValue});
}

void CommandLine::repeated(const std::string& name, const std::string& value_name,
                           const std::string& help) {
  add({name, value_name, help, std::nullopt, Kind::kRepeated});
}

void CommandLine::list(const std::string& name, const std::string& value_name,
                       const std::string& help) {
  add({name, value_name, help, std::nullopt, Kind::kList});
}

void CommandLine::switch_flag(const std::string& name, const std::string& help) {
  add({name, "", help, std::nullopt, Kind::kSwitch});
}

void CommandLine::positional(const std::string& name, const std::string& help) {
  add({name, name, help, std::nullopt, Kind::kPositional});
}

void CommandLine::details(std::string text) { details_ = std::move(text); }

const CommandLine::Spec* CommandLine::find(const std::string& name) const {
  for (const Spec& s : specs_) {
    if (s.name == name && s.kind != Kind::kPositional) return &s;
  }
  return nullptr;
}

bool CommandLine::names_a_flag(const std::string& arg) const {
  if (arg.rfind("--", 0) != 0) return false;
  const std::string name = normalise(arg.substr(2, arg.find('=') - 2));
  return name == "help" || find(name) != nullptr;
}

void CommandLine::store(const Spec& spec, const std::string& value) {
  std::vector<std::string>& values = values_[spec.name];
  switch (spec.kind) {
    case Kind::kList:
      for (absl::string_view piece : absl::StrSplit(value, ',', absl::SkipEmpty())) {
        values.emplace_back(piece);
      }
      break;
    case Kind::kRepeated:
      values.push_back(value);
      break;
    default:
      values = {value};
  }
}

bool CommandLine::parse(int argc, char** argv) {
  std::vector<const Spec*> positionals;
  for (const Spec& s : specs_) {
    if (s.kind == Kind::kPositional) positionals.push_back(&s);
  }
  std::size_t next_positional = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::fputs(usage().c_str(), stdout);
      return false;
    }
    if (arg.rfind("--", 0) != 0 || arg.size() == 2) {
      MOTLEY_CHECK_KIND(kUsage, next_positional < positionals.size(), "unexpected argument '", arg,
                        "' (see motley ", command_, " --help)");
      values_[positionals[next_positional++]->name].push_back(arg);
      continue;
    }
    std::string name = arg.substr(2), value;
    bool inline_value = false;
    if (const auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      inline_value = true;
    }
    name = normalise(name);
    const Spec* spec = find(name);
    MOTLEY_CHECK_KIND(kUsage, spec != nullptr, "unknown flag --", name, " (see motley ", command_,
                      " --help)");
    if (spec->kind == Kind::kSwitch) {
      MOTLEY_CHECK_KIND(kUsage, !inline_value || value == "true" || value == "false", "--", name,
                        " takes no value");
      values_[name] = {inline_value ? value : "true"};
      continue;
    }
    if (!inline_value) {
      MOTLEY_CHECK_KIND(kUsage, i + 1 < argc && !names_a_flag(argv[i + 1]), "--", name, " needs a ",
                        spec->value_name);
      value = argv[++i];
    }
    store(*spec, value);
    // A list's further paths up to the next flag belong to it.
    while (spec->kind == Kind::kList && !inline_value && i + 1 < argc &&
           std::string(argv[i + 1]).rfind("--", 0) != 0) {
      store(*spec, argv[++i]);
    }
  }
  for (std::size_t p = next_positional; p < positionals.size(); ++p) {
    MOTLEY_FAIL(kUsage, "missing ", positionals[p]->name, " (see motley ", command_, " --help)");
  }
  return true;
}

bool CommandLine::has(const std::string& name) const {
  auto it = values_.find(name);
  return it != values_.end() && !it->second.empty();
}

std::string CommandLine::get(const std::string& name) const {
  if (has(name)) return values_.at(name).back();
  for (const Spec& s : specs_) {
    if (s.name == name && s.default_value) return *s.default_value;
  }
  MOTLEY_FAIL(kUsage, "--", name, " is required (see motley ", command_, " --help)");
}

std::string CommandLine::get_or(const std::string& name, const std::string& fallback) const {
  return has(name) ? values_.at(name).back() : fallback;
}

std::int64_t CommandLine::get_int(const std::string& name) const {
  std::int64_t v = 0;
  const std::string text = get(name);
  MOTLEY_CHECK_KIND(kUsage, absl::SimpleAtoi(text, &v), "--", name, " must be an integer, got '",
                    text, "'");
  return v;
}

std::uint64_t CommandLine::get_uint64(const std::string& name) const {
  std::uint64_t v = 0;
  const std::string text = get(name);
  MOTLEY_CHECK_KIND(kUsage, absl::SimpleAtoi(text, &v), "--", name,
                    " must be a non-negative integer, got '", text, "'");
  return v;
}

double CommandLine::get_double(const std::string& name) const {
  double v = 0;
  const std::string text = get(name);
  MOTLEY_CHECK_KIND(kUsage, absl::SimpleAtod(text, &v), "--", name, " must be a number, got '",
                    text, "'");
  return v;
}

bool CommandLine::get_switch(const std::string& name) const {
  return has(name) && values_.at(name).back() == "true";
}

std::vector<std::string> CommandLine::all(const std::string& name) const {
  auto it = values_.find(name);
  return it == values_.end() ? std::vector<std::string>{} : it->second;
}

std::string CommandLine::usage() const {
  std::string out = absl::StrCat("usage: motley ", command_);
  for (const Spec& s : specs_) {
    if (s.kind == Kind::kPositional) absl::StrAppend(&out, " ", s.name);
  }
  absl::StrAppend(&out, " [flags]\n\n", wrap(summary_, 0, 0), "\n\nflags:\n");
  auto entry = [&](std::string left, std::string help) {
    if (left.size() < kHelpColumn)
      left.resize(kHelpColumn, ' ');
    else
      left += ' ';
    absl::StrAppend(&out, left, wrap(help, left.size(), kHelpColumn), "\n");
  };
  for (const Spec& s : specs_) {
    std::string left = "  ";
    if (s.kind == Kind::kPositional) {
      left += s.name;
    } else {
      absl::StrAppend(&left, "--", s.name, s.kind == Kind::kSwitch ? "" : " " + s.value_name,
                      s.kind == Kind::kList ? "..." : "");
    }
    std::string help = s.help;
    if (s.default_value) absl::StrAppend(&help, " (default: ", *s.default_value, ")");
    if (s.kind == Kind::kRepeated || s.kind == Kind::kList) absl::StrAppend(&help, " [repeatable]");
    entry(left, help);
  }
  entry("  --help", "print this help");
  if (!details_.empty()) absl::StrAppend(&out, "\n", details_);
  return out;
}

}  // namespace motley::apps
