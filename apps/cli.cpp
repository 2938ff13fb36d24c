#include "apps/cli.h"

#include <cstdio>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "core/check.h"

namespace motley::apps {

CommandLine::CommandLine(std::string command, std::string summary)
    : command_(std::move(command)), summary_(std::move(summary)) {}

void CommandLine::flag(const std::string& name, const std::string& value_name,
                       const std::string& help, std::optional<std::string> default_value) {
  specs_.push_back({name, value_name, help, std::move(default_value)});
}

void CommandLine::repeated(const std::string& name, const std::string& value_name,
                           const std::string& help) {
  Spec s{name, value_name, help, std::nullopt};
  s.repeated = true;
  specs_.push_back(s);
}

void CommandLine::switch_flag(const std::string& name, const std::string& help) {
  Spec s{name, "", help, std::nullopt};
  s.is_switch = true;
  specs_.push_back(s);
}

void CommandLine::positional(const std::string& name, const std::string& help) {
  Spec s{name, name, help, std::nullopt};
  s.is_positional = true;
  specs_.push_back(s);
}

const CommandLine::Spec* CommandLine::find(const std::string& name) const {
  for (const Spec& s : specs_) {
    if (s.name == name && !s.is_positional) return &s;
  }
  return nullptr;
}

bool CommandLine::parse(int argc, char** argv) {
  std::vector<const Spec*> positionals;
  for (const Spec& s : specs_) {
    if (s.is_positional) positionals.push_back(&s);
  }
  std::size_t next_positional = 0;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::fputs(usage().c_str(), stdout);
      return false;
    }
    if (arg.rfind("--", 0) != 0 || arg.size() == 2) {
      MOTLEY_CHECK_KIND(kUsage, next_positional < positionals.size(), "motley ", command_,
                        ": unexpected argument '", arg, "' (see motley ", command_, " --help)");
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
    const Spec* spec = find(name);
    MOTLEY_CHECK_KIND(kUsage, spec != nullptr, "motley ", command_, ": unknown flag --", name,
                      " (see motley ", command_, " --help)");
    if (spec->is_switch) {
      MOTLEY_CHECK_KIND(kUsage, !inline_value || value == "true" || value == "false",
                        "motley ", command_, ": --", name, " takes no value");
      values_[name] = {inline_value ? value : "true"};
      continue;
    }
    if (!inline_value) {
      MOTLEY_CHECK_KIND(kUsage, i + 1 < argc, "motley ", command_, ": --", name, " needs a ",
                        spec->value_name);
      value = argv[++i];
    }
    if (spec->repeated) {
      values_[name].push_back(value);
    } else {
      values_[name] = {value};
    }
  }
  for (std::size_t p = next_positional; p < positionals.size(); ++p) {
    MOTLEY_FAIL(kUsage, "motley ", command_, ": missing ", positionals[p]->name, " (see motley ",
                command_, " --help)");
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
  MOTLEY_FAIL(kUsage, "motley ", command_, ": --", name, " is required (see motley ", command_,
              " --help)");
}

std::string CommandLine::get_or(const std::string& name, const std::string& fallback) const {
  return has(name) ? values_.at(name).back() : fallback;
}

std::int64_t CommandLine::get_int(const std::string& name) const {
  std::int64_t v = 0;
  const std::string text = get(name);
  MOTLEY_CHECK_KIND(kUsage, absl::SimpleAtoi(text, &v), "motley ", command_, ": --", name,
                    " must be an integer, got '", text, "'");
  return v;
}

double CommandLine::get_double(const std::string& name) const {
  double v = 0;
  const std::string text = get(name);
  MOTLEY_CHECK_KIND(kUsage, absl::SimpleAtod(text, &v), "motley ", command_, ": --", name,
                    " must be a number, got '", text, "'");
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
    if (s.is_positional) absl::StrAppend(&out, " ", s.name);
  }
  absl::StrAppend(&out, " [flags]\n\n", summary_, "\n\nflags:\n");
  for (const Spec& s : specs_) {
    std::string left = s.is_positional ? "  " + s.name
                                       : absl::StrCat("  --", s.name,
                                                      s.is_switch ? "" : " " + s.value_name);
    if (left.size() < 28) left.resize(28, ' ');
    absl::StrAppend(&out, left, " ", s.help);
    if (s.default_value) absl::StrAppend(&out, " (default: ", *s.default_value, ")");
    if (s.repeated) absl::StrAppend(&out, " [repeatable]");
    absl::StrAppend(&out, "\n");
  }
  std::string help = "  --help";
  help.resize(28, ' ');
  absl::StrAppend(&out, help, " print this help\n");
  return out;
}

}  // namespace motley::apps
