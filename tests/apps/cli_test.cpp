// CommandLine (apps/cli.h): the flag forms every subcommand accepts, the
// errors it raises (kUsage, naming the flag) and its --help text.
#include "apps/cli.h"

#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/check.h"

namespace motley::apps {
namespace {

// A CommandLine like prepare's plus one of each other kind.
CommandLine make_cli() {
  CommandLine cli("demo", "A demo command whose summary is long enough that --help has to wrap "
                          "it onto a second line of output.");
  cli.list("input", "PATH", "paths to read");
  cli.flag("out", "DIR", "output folder");
  cli.flag("vocab-size", "N", "vocabulary", std::string("4096"));
  cli.repeated("set", "KEY=VALUE", "override a config key; its value may hold commas, which are "
                                   "not split, and this help is long enough to wrap twice over");
  cli.switch_flag("no-probs", "skip the probabilities");
  cli.details("Details paragraph.\n");
  return cli;
}

// Parses args (without the command name) into cli; false after --help.
bool parse(CommandLine& cli, std::vector<std::string> args) {
  args.insert(args.begin(), "demo");
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  return cli.parse(static_cast<int>(argv.size()), argv.data());
}

// The kUsage message parse raises for args ("" if it does not throw).
std::string usage_error(CommandLine cli, const std::vector<std::string>& args) {
  try {
    parse(cli, args);
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kUsage) << e.what();
    return e.what();
  }
  return "";
}

TEST(CommandLine, ValueFormsAndDefaults) {
  CommandLine cli = make_cli();
  ASSERT_TRUE(parse(cli, {"--out", "a", "--out=b", "--set", "x=[1,2]", "--set=y=3"}));
  EXPECT_EQ(cli.get("out"), "b");  // the last of a plain flag wins
  EXPECT_EQ(cli.all("set"), (std::vector<std::string>{"x=[1,2]", "y=3"}));  // commas kept
  EXPECT_EQ(cli.get_int("vocab-size"), 4096);
  EXPECT_FALSE(cli.has("vocab-size"));
  EXPECT_FALSE(cli.get_switch("no-probs"));
  EXPECT_EQ(cli.get_or("input", "none"), "none");
}

TEST(CommandLine, UnderscoreStandsForDash) {
  CommandLine cli = make_cli();
  ASSERT_TRUE(parse(cli, {"--vocab_size", "300", "--no_probs"}));
  EXPECT_EQ(cli.get_int("vocab-size"), 300);
  EXPECT_TRUE(cli.get_switch("no-probs"));
}

TEST(CommandLine, ListTakesPathsUpToTheNextFlagAndSplitsCommas) {
  CommandLine cli = make_cli();
  ASSERT_TRUE(parse(cli, {"--input", "a", "b,c", "--out", "o", "--input=d,,e", "--input", "f"}));
  EXPECT_EQ(cli.all("input"), (std::vector<std::string>{"a", "b", "c", "d", "e", "f"}));
  EXPECT_EQ(cli.get("out"), "o");
}

TEST(CommandLine, SwitchForms) {
  CommandLine cli = make_cli();
  ASSERT_TRUE(parse(cli, {"--no-probs=false"}));
  EXPECT_FALSE(cli.get_switch("no-probs"));
  EXPECT_NE(usage_error(make_cli(), {"--no-probs=yes"}).find("--no-probs takes no value"),
            std::string::npos);
}

TEST(CommandLine, ErrorsNameTheFlag) {
  const CommandLine cli = make_cli();
  EXPECT_NE(usage_error(cli, {"--bogus", "1"}).find("unknown flag --bogus (see motley demo --help)"),
            std::string::npos);
  EXPECT_NE(usage_error(cli, {"--out"}).find("--out needs a DIR"), std::string::npos);
  // A value that is another flag of the command is a missing value...
  EXPECT_NE(usage_error(cli, {"--out", "--vocab_size=3"}).find("--out needs a DIR"),
            std::string::npos);
  // ...but one that merely starts with dashes is a value.
  CommandLine dashes = make_cli();
  ASSERT_TRUE(parse(dashes, {"--out", "--weird-folder"}));
  EXPECT_EQ(dashes.get("out"), "--weird-folder");
  EXPECT_NE(usage_error(cli, {"stray"}).find("unexpected argument 'stray'"), std::string::npos);

  CommandLine parsed = make_cli();
  ASSERT_TRUE(parse(parsed, {"--vocab-size", "many"}));
  try {
    parsed.get_int("vocab-size");
    ADD_FAILURE() << "no error for a non-integer";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kUsage);
    EXPECT_NE(std::string(e.what()).find("--vocab-size must be an integer, got 'many'"),
              std::string::npos);
  }
  CommandLine seeds = make_cli();
  seeds.flag("seed", "S", "a seed");
  ASSERT_TRUE(parse(seeds, {"--seed", "18446744073709551615"}));
  EXPECT_EQ(seeds.get_uint64("seed"), 18446744073709551615ull);
  CommandLine negative = make_cli();
  negative.flag("seed", "S", "a seed");
  ASSERT_TRUE(parse(negative, {"--seed", "-3"}));
  try {
    negative.get_uint64("seed");
    ADD_FAILURE() << "no error for a negative seed";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--seed must be a non-negative integer, got '-3'"),
              std::string::npos);
  }
  try {
    parsed.get("out");
    ADD_FAILURE() << "no error for a missing required flag";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--out is required"), std::string::npos);
  }
}

TEST(CommandLine, Positionals) {
  CommandLine cli("show", "Show a thing.");
  cli.positional("PATH", "the thing");
  cli.flag("depth", "N", "how deep", std::string("1"));
  ASSERT_TRUE(parse(cli, {"--depth", "2", "file.h5"}));
  EXPECT_EQ(cli.get("PATH"), "file.h5");
  CommandLine missing("show", "Show a thing.");
  missing.positional("PATH", "the thing");
  EXPECT_NE(usage_error(missing, {}).find("missing PATH"), std::string::npos);
}

TEST(CommandLine, HelpListsEveryFlagWithinEightyColumns) {
  CommandLine cli = make_cli();
  ::testing::internal::CaptureStdout();
  const bool go_on = parse(cli, {"--out", "x", "--help"});
  const std::string help = ::testing::internal::GetCapturedStdout();
  EXPECT_FALSE(go_on);
  EXPECT_EQ(help, cli.usage());
  for (const char* needle : {"usage: motley demo [flags]", "--input PATH...", "--out DIR",
                             "(default: 4096)", "--no-probs", "[repeatable]", "--help",
                             "Details paragraph."}) {
    EXPECT_NE(help.find(needle), std::string::npos) << needle << "\n" << help;
  }
  std::istringstream lines(help);
  int wrapped = 0;
  for (std::string line; std::getline(lines, line);) {
    EXPECT_LE(line.size(), 80u) << line;
    // Continuation lines of a flag's help start at its help column.
    if (line.rfind(std::string(29, ' '), 0) == 0) {
      ++wrapped;
      EXPECT_NE(line[29], ' ') << line;
    }
  }
  EXPECT_GE(wrapped, 2) << help;
}

}  // namespace
}  // namespace motley::apps
