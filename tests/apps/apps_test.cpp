// Runs the motley binary as a user would, in a temporary directory.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "apps/train_support.h"
#include "checkpoint/checkpoint.h"
#include "data/token_file.h"
#include "data/tokenizer.h"
#include "layers/transformer.h"
#include "nlohmann/json.hpp"

namespace motley {
namespace {

namespace fs = std::filesystem;

struct Result {
  int exit_code = -1;
  std::string output;  // stdout and stderr
};

Result run(const std::string& args, const std::string& dir) {
  const std::string log = dir + "/last_output.txt";
  const std::string cmd = "cd '" + dir + "' && '" + MOTLEY_BINARY + "' " + args + " > '" + log +
                          "' 2>&1";
  const int status = std::system(cmd.c_str());
  Result r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream in(log);
  std::stringstream ss;
  ss << in.rdbuf();
  r.output = ss.str();
  return r;
}

// A temporary working directory with a small token corpus (a noisy
// periodic sequence the model can learn) and a config for it.
class AppsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "/motley_apps_" +
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::remove_all(dir_);
    fs::create_directories(dir_ + "/data");
    std::vector<std::uint32_t> train(20000), valid(2000);
    std::uint32_t x = 1;
    for (std::size_t i = 0; i < train.size(); ++i) {
      x = x * 1103515245u + 12345u;
      train[i] = (i % 7) * 5 + ((x >> 16) % 3 == 0 ? (x >> 20) % 5 : 0);
    }
    for (std::size_t i = 0; i < valid.size(); ++i) valid[i] = train[i + 7];
    write_token_file(dir_ + "/data/train.h5", train, 64);
    write_token_file(dir_ + "/data/valid.h5", valid, 64);
    std::ofstream cfg(dir_ + "/tiny.json");
    cfg << R"({
      "model": {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2,
                "max_seq_len": 64, "ffn_hidden": 48,
                "moe": {"n_experts": 4, "top_k": 2, "expert_hidden": 32,
                        "expert_sizes": "modse"}},
      "train": {"batch_size": 8, "micro_batches": 2, "seq_len": 16, "steps": 30,
                "lr": 1e-2, "min_lr": 1e-3, "warmup": 5, "log_every": 5,
                "eval_every": 10, "ckpt_every": 10, "keep_last": 2, "seed": 3},
      "data": {"train": "data/train.h5", "valid": "data/valid.h5"}
    })";
  }
  std::string dir_;
};

std::vector<nlohmann::json> read_metrics(const std::string& path) {
  std::vector<nlohmann::json> rows;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) rows.push_back(nlohmann::json::parse(line));
  return rows;
}

TEST_F(AppsTest, TrainingLowersTheLossAndWritesTheRunDirectory) {
  const Result r = run("train --config tiny.json --run run", dir_);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("step 30/30"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("final eval"), std::string::npos) << r.output;
  EXPECT_TRUE(fs::exists(dir_ + "/run/config.json"));
  EXPECT_TRUE(fs::exists(dir_ + "/run/checkpoints/step_00000030.h5"));
  EXPECT_TRUE(fs::exists(dir_ + "/run/checkpoints/step_00000020.h5"));
  EXPECT_FALSE(fs::exists(dir_ + "/run/checkpoints/step_00000010.h5"));  // keep_last 2
  const auto rows = read_metrics(dir_ + "/run/metrics.jsonl");
  std::vector<double> losses;
  for (const auto& row : rows) {
    if (!row.contains("loss")) continue;
    losses.push_back(row["loss"].get<double>());
    for (const char* key : {"step", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s",
                            "mfu", "skipped_steps", "expert_tokens",
                            "active_params_per_token"}) {
      EXPECT_TRUE(row.contains(key)) << key;
    }
    EXPECT_EQ(row["expert_tokens"].size(), 2u);  // two MoE layers
    EXPECT_EQ(row["expert_tokens"][0].size(), 4u);
  }
  ASSERT_EQ(losses.size(), 6u);
  EXPECT_LT(losses.back(), losses.front() - 0.5);
  bool eval_row = false;
  for (const auto& row : rows) eval_row |= row.contains("eval_loss") && row.contains("eval_ppl");
  EXPECT_TRUE(eval_row);
}

TEST_F(AppsTest, ResumeGivesBitwiseEqualLosses) {
  ASSERT_EQ(run("train --config tiny.json --run straight", dir_).exit_code, 0);
  // Continue the straight run's step-20 checkpoint in a fresh directory.
  const Result r = run("train --config tiny.json --run resumed --resume straight/checkpoints/"
                       "step_00000020.h5",
                       dir_);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("resumed from"), std::string::npos);
  const auto a = read_metrics(dir_ + "/straight/metrics.jsonl");
  const auto b = read_metrics(dir_ + "/resumed/metrics.jsonl");
  std::map<std::int64_t, double> straight;
  for (const auto& row : a) {
    if (row.contains("loss")) straight[row["step"].get<std::int64_t>()] = row["loss"];
  }
  int compared = 0;
  for (const auto& row : b) {
    if (!row.contains("loss")) continue;
    const std::int64_t step = row["step"];
    EXPECT_GT(step, 20);
    EXPECT_EQ(row["loss"].get<double>(), straight.at(step)) << "step " << step;
    ++compared;
  }
  EXPECT_EQ(compared, 2);  // steps 25 and 30
  // Parameters at the end are bitwise equal too.
  const CheckpointReader x = CheckpointReader::open(dir_ + "/straight/checkpoints/step_00000030.h5");
  const CheckpointReader y = CheckpointReader::open(dir_ + "/resumed/checkpoints/step_00000030.h5");
  for (const std::string& name : x.names("model")) {
    EXPECT_EQ(x.read("model", name).to_vector<float>(), y.read("model", name).to_vector<float>())
        << name;
  }
}

TEST_F(AppsTest, ResumeAutoContinuesAndTruncatesMetrics) {
  ASSERT_EQ(run("train --config tiny.json --run run --set train.steps=20", dir_).exit_code, 0);
  // Pretend the job died after logging step 25 of a longer run.
  {
    std::ofstream out(dir_ + "/run/metrics.jsonl", std::ios::app);
    out << R"({"step": 25, "loss": 99.0})" << "\n";
  }
  const Result r = run("train --config tiny.json --run run --set train.steps=30", dir_);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("resumed from"), std::string::npos) << r.output;
  int rows_at_25 = 0;
  for (const auto& row : read_metrics(dir_ + "/run/metrics.jsonl")) {
    if (row["step"] == 25 && row.contains("loss")) {
      ++rows_at_25;
      EXPECT_NE(row["loss"].get<double>(), 99.0);
    }
  }
  EXPECT_EQ(rows_at_25, 1);
}

TEST_F(AppsTest, EvalOfAKnownCheckpoint) {
  // A model whose LM head is zero predicts the uniform distribution: the
  // eval loss is exactly ln(V) whatever the data.
  const Config config = Config::load(dir_ + "/tiny.json");
  Transformer model(config.model, 1);
  Tensor head = model.params().get("lm_head.weight").data();
  head.zero_();
  CheckpointMeta meta;
  meta.config_json = config.resolved_json().dump();
  save_checkpoint(dir_ + "/uniform.h5", model.params(), nullptr, meta, "");
  const Result r = run("eval --checkpoint uniform.h5 --data data/valid.h5", dir_);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto at = r.output.find("eval_loss ");
  ASSERT_NE(at, std::string::npos) << r.output;
  EXPECT_NEAR(std::stod(r.output.substr(at + 10)), std::log(64.0), 1e-5);
  EXPECT_NE(r.output.find("eval_bpb n/a"), std::string::npos) << r.output;  // no tokenizer
}

TEST_F(AppsTest, BadInputGetsAClearErrorAndItsExitCode) {
  struct Case {
    std::string args;
    int exit_code;
    std::string message;
  };
  {
    std::ofstream out(dir_ + "/data/garbage.h5");
    out << "not an hdf5 file";
  }
  std::vector<std::uint32_t> bad = {1, 2, 3, 70, 4, 5};
  for (int i = 0; i < 100; ++i) bad.push_back(i % 60);
  write_token_file(dir_ + "/data/out_of_range.h5", bad, 80);  // ids fit 80, not 64
  {
    std::ofstream out(dir_ + "/broken.h5");
    out << "garbage";
  }
  const std::vector<Case> cases = {
      {"frobnicate", 2, "unknown subcommand"},
      {"train", 2, "--config is required"},
      {"train --config tiny.json --bogus 1", 2, "unknown flag --bogus"},
      {"train --config missing.json", 2, "cannot open config file"},
      {"train --config tiny.json --set model.d_modle=3", 2, "model.d_modle"},
      {"train --config tiny.json --set model.n_heads=3", 2, "model.n_heads"},
      {"train --config tiny.json --set train.lr=fast", 2, "train.lr"},
      {"train --config tiny.json --set data.train=data/none.h5", 3, "data/none.h5"},
      {"train --config tiny.json --set data.train=data/garbage.h5", 3, "data/garbage.h5"},
      {"train --config tiny.json --set data.train=data/out_of_range.h5", 2, "vocab_size"},
      {"eval --checkpoint broken.h5 --data data/valid.h5", 4, "broken.h5"},
      {"eval --checkpoint nothing.h5 --data data/valid.h5", 4, "does not exist"},
      {"inspect nothing.h5", 4, "does not exist"},
      {"train --config tiny.json --resume broken.h5", 4, "broken.h5"},
      {"prepare --out prep", 2, "--input is required"},
      {"prepare --input tiny.json", 2, "--out is required"},
      {"prepare --input tiny.json --out --seed 3", 2, "--out needs a DIR"},
      {"prepare --input tiny.json --out prep --vocab-size 100", 2, "--vocab-size must be in [257"},
      {"prepare --input tiny.json --out prep --valid-fraction 1", 2, "--valid-fraction must be"},
      {"prepare --input tiny.json --out prep --seed -1", 2, "--seed must be a non-negative"},
      {"prepare --input tiny.json --out prep --sed 3", 2, "unknown flag --sed"},
      {"prepare --input nowhere --out prep", 3, "nowhere does not exist"},
      {"prepare --input tiny.json --out prep", 3, "needs at least 2"},  // one document
  };
  for (const Case& c : cases) {
    const Result r = run(c.args, dir_);
    EXPECT_EQ(r.exit_code, c.exit_code) << c.args << "\n" << r.output;
    EXPECT_NE(r.output.find(c.message), std::string::npos) << c.args << "\n" << r.output;
  }
  EXPECT_FALSE(fs::exists(dir_ + "/prep")) << "a refused prepare wrote its output folder";
}

// The documents of one token file: its tokens decoded and split at eot.
std::vector<std::string> decode_documents(const std::string& token_path, const Tokenizer& tok) {
  const TokenFile file = TokenFile::open(token_path);
  EXPECT_EQ(file.vocab_size(), tok.vocab_size()) << token_path;
  std::vector<std::int64_t> ids(static_cast<std::size_t>(file.size()));
  file.read(0, file.size(), ids.data());
  std::vector<std::string> docs;
  std::vector<std::int32_t> doc;
  for (const std::int64_t id : ids) {
    if (id == tok.eot_id()) {
      docs.push_back(tok.decode(doc));
      doc.clear();
    } else {
      doc.push_back(static_cast<std::int32_t>(id));
    }
  }
  EXPECT_TRUE(doc.empty()) << token_path << " does not end with end-of-text";
  return docs;
}

TEST_F(AppsTest, PrepareSplitsEveryDocumentOnceAndTrainingReadsTheResult) {
  // 8 plain-text documents in a folder (plus a hidden file it skips) and
  // 4 JSONL documents: 12 in all, each some 400 bytes.
  std::map<std::string, int> want;  // document -> how often it must appear
  fs::create_directories(dir_ + "/corpus/sub");
  auto text = [](int i) {
    std::string t;
    for (int w = 0; w < 70; ++w) t += "word" + std::to_string((i * 7 + w * w) % 23) + " ";
    return t + "end " + std::to_string(i) + "\n";
  };
  for (int i = 0; i < 8; ++i) {
    std::ofstream(dir_ + (i < 4 ? "/corpus/" : "/corpus/sub/") + std::to_string(i) + ".txt")
        << text(i);
    ++want[text(i)];
  }
  std::ofstream(dir_ + "/corpus/.hidden") << "never read";
  {
    std::ofstream jsonl(dir_ + "/more.jsonl");
    for (int i = 8; i < 12; ++i) {
      jsonl << nlohmann::json{{"text", text(i)}, {"id", i}}.dump() << "\n";
      ++want[text(i)];
    }
  }
  const std::string args =
      "prepare --input corpus/0.txt,corpus/1.txt corpus/sub --input=more.jsonl "
      "--input corpus/2.txt corpus/3.txt --vocab_size=300 --valid-fraction 0.25 --seed 7 --out ";
  const Result r = run(args + "prep", dir_);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("read 12 documents"), std::string::npos) << r.output;

  const Tokenizer tok = Tokenizer::load(dir_ + "/prep/tokenizer.json");
  EXPECT_GT(tok.vocab_size(), 257);
  EXPECT_LE(tok.vocab_size(), 300);
  const std::vector<std::string> train = decode_documents(dir_ + "/prep/train.h5", tok);
  const std::vector<std::string> valid = decode_documents(dir_ + "/prep/valid.h5", tok);
  EXPECT_GE(train.size(), 1u);
  EXPECT_GE(valid.size(), 1u);
  std::map<std::string, int> got;
  for (const auto* split : {&train, &valid}) {
    for (const std::string& d : *split) ++got[d];
  }
  EXPECT_EQ(got, want) << "every document exactly once, bytes unchanged";

  // The same flags give the same files; the result trains.
  ASSERT_EQ(run(args + "prep2", dir_).exit_code, 0);
  EXPECT_EQ(decode_documents(dir_ + "/prep2/train.h5", tok), train);
  const Result t = run("train --config tiny.json --run run --set train.steps=4 --set "
                       "model.vocab_size=" + std::to_string(tok.vocab_size()) +
                           " --set data.train=prep/train.h5 --set data.valid=prep/valid.h5",
                       dir_);
  EXPECT_EQ(t.exit_code, 0) << t.output;
}

TEST_F(AppsTest, InspectAndHelpDescribeEverything) {
  ASSERT_EQ(run("train --config tiny.json --run run --set train.steps=10", dir_).exit_code, 0);
  const Result r = run("inspect run", dir_);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const char* needle : {"step          10", "layers.1.moe.experts.3.w2", "total parameters",
                             "active parameters per token", "modse"}) {
    EXPECT_NE(r.output.find(needle), std::string::npos) << needle << "\n" << r.output;
  }
  for (const char* sub : {"train", "eval", "generate", "inspect", "prepare", "bench-kernels"}) {
    const Result h = run(std::string(sub) + " --help", dir_);
    EXPECT_EQ(h.exit_code, 0) << sub << "\n" << h.output;
    EXPECT_NE(h.output.find("--"), std::string::npos) << sub;
  }
  EXPECT_EQ(run("--help", dir_).exit_code, 0);
}

// metrics.jsonl rows whose "step" is not an integer (null, a string, an
// object), other JSON and deep nesting are dropped with a warning when a
// run resumes; they used to stop the resume with exit 1 and a raw JSON
// exception.
TEST(MetricsLog, MalformedRowsAreDroppedNotFatal) {
  const std::string path = ::testing::TempDir() + "motley_metrics_malformed.jsonl";
  {
    std::ofstream out(path);
    out << R"({"step": 1, "loss": 5})"
        << "\n"
        << R"({"step": null})"
        << "\n"
        << R"({"step": "7"})"
        << "\n"
        << R"({"step": {"a": 1}})"
        << "\n"
        << R"([1, 2, 3])"
        << "\n"
        << std::string(100000, '[') << "\n"
        << R"({"step": 2, "loss": 4})"
        << "\n"
        << R"({"step": 9, "loss": 3})"
        << "\n"
        << R"({"step": 3, "lo)";  // torn
  }
  apps::MetricsLog log(path, /*resume_step=*/5);
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[0], R"({"step": 1, "loss": 5})");
  EXPECT_EQ(lines[1], R"({"step": 2, "loss": 4})");
  std::remove(path.c_str());
}

}  // namespace
}  // namespace motley
