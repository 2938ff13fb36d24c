// The training step of motley, once, for every layout and device.
//
//   Trainer trainer(config, groups, batches);
//   while (trainer.step_count() < config.train.steps) {
//     StepResult r = trainer.step();        // one optimizer update
//     ...                                   // log r, evaluate, checkpoint
//   }
//
// One step, top to bottom (SPEC sections 1.5, 3):
//
//   zero gradients
//   forward + backward of this rank's micro-batches on the 1F1B schedule
//       (PipelineExecutor; one stage and no messages when pp = 1)
//   gradients summed over replicas (GradReducer, overlapped with the last
//       backward; the shared GRU cell over the pipeline as well)
//   losses, routing statistics and the global grad norm agreed over the job
//   skip the update if anything is non-finite; else clip and AdamW
//   every parallel.replace_every steps: re-place experts (balanced placement)
//
// A single process is a world of 1 (parallel::LocalCommunicator): the same
// code, with every collective an identity. Under mpirun, srun or the
// in-process ThreadCommunicator, every rank of a (dp, ep, pp) layout
// constructs a Trainer over its ProcessGroups and calls step() in lockstep;
// every call below that says "collective" must be made by every rank.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "core/config.h"
#include "layers/optimizer.h"
#include "layers/transformer.h"
#include "parallel/expert_exchange.h"
#include "parallel/grad_reducer.h"
#include "parallel/process_groups.h"
#include "train/pipeline.h"
#include "train/replacement.h"

namespace motley::train {

struct StepResult {
  std::int64_t step = 0;  // the update this was (1-based)
  double lr = 0;
  double loss = 0, lm_loss = 0, aux_loss = 0, grad_norm = 0;
  bool skipped = false;            // non-finite loss or gradient: no update
  std::vector<MoELayerStats> moe;  // every MoE layer of the model, whole job, summed
  // Bytes all ranks sent to other ranks in the expert all-to-alls of the
  // step (forward and backward); 0 without expert parallelism.
  double ep_bytes = 0;
  double model_flops = 0;                        // of the whole step (train/flops.h)
  std::optional<ReplacementReport> replacement;  // experts moved after this step
};

class Trainer {
 public:
  // Builds this rank's shard of the model (initialised from train.seed, so
  // every layout holds the same global model) on `device` with fresh
  // AdamW state, at step 0. `groups` carries the model's tensors
  // (train/device.h: make_process_groups); its host() communicator the
  // host-side agreement. Collective over groups.
  Trainer(const Config& config, std::shared_ptr<parallel::ProcessGroups> groups,
          BatchSource batches, Device device = Device::cpu());
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  // Runs update step_count() + 1 with the scheduled learning rate. Throws
  // kRuntime after 10 consecutive skipped steps (nothing saved), and at the
  // step named by MOTLEY_FAULT_INJECT (Note [Fault injection]). Collective.
  StepResult step();

  // Loads model, optimizer state, step and tokens_seen from the checkpoint
  // at `path` (saved under any layout). Returns the config keys, outside
  // model.*, whose values differ from the checkpoint's (the new values
  // apply); kCheckpoint for a different architecture or a bad file.
  std::vector<std::string> resume(const std::string& path);

  // Writes one complete checkpoint at `path` (SPEC section 5) from every
  // rank's shard, without gathering. Collective over groups.host().
  void save(const std::string& path, const std::string& tokenizer_json);

  // The whole model for evaluation: on world rank 0 this rank's model
  // (single process) or a copy gathered from every rank's shard
  // (parameters only); nullptr on the other ranks. Collective.
  Transformer* eval_model();

  // Whether `local` is true on any rank: the one decision every rank takes
  // alike (stop signals). Collective over groups.host().
  bool any_rank(bool local);

  const Config& config() const { return config_; }
  const parallel::ProcessGroups& groups() const { return *groups_; }
  const Transformer& model() const { return *model_; }
  Transformer& model() { return *model_; }
  const AdamW& optimizer() const { return optimizer_; }
  Device device() const { return device_; }
  const std::vector<int>& expert_owner() const { return owner_; }  // Note [Expert placement]
  std::int64_t step_count() const { return step_; }
  std::int64_t tokens_seen() const { return tokens_seen_; }
  std::int64_t skipped_steps() const { return skipped_; }
  // Steps between re-placement decisions; 0 when the owner map is fixed.
  std::int64_t replace_every() const { return window_.every(); }

 private:
  std::unique_ptr<Transformer> build_model(const std::vector<int>& owner) const;
  void build_reducer();
  void replace_experts(const std::vector<int>& next);
  // World rank that writes `name` to a checkpoint (checkpoint_writer).
  int contributor(const std::string& name) const;

  Config config_;
  std::shared_ptr<parallel::ProcessGroups> groups_;
  BatchSource batches_;
  Device device_;
  std::vector<int> owner_;  // Note [Expert placement]
  int gru_stage_ = -1;      // first stage holding the shared GRU cell; -1: none
  std::unique_ptr<Transformer> model_;
  AdamW optimizer_;
  PipelineExecutor pipeline_;
  std::unique_ptr<parallel::CommExpertExchange> exchange_;
  std::unique_ptr<parallel::GradReducer> reducer_;
  ReplacementWindow window_;                 // its every(): 0 when the owner map is fixed
  std::vector<TensorSpec> ckpt_specs_;       // every global parameter (sharded saves)
  std::vector<int> ckpt_writer_;             // world rank writing each of ckpt_specs_
  std::unique_ptr<Transformer> full_model_;  // rank 0 of a parallel run, for evaluation
  int fault_rank_ = -1;                      // Note [Fault injection]
  std::int64_t fault_step_ = -1;
  int consecutive_skips_ = 0;
  std::int64_t step_ = 0;
  std::int64_t tokens_seen_ = 0;
  std::int64_t skipped_ = 0;
};

// The sampler of SPEC section 4 over `file` (train.seed): the BatchSource
// of `motley train`.
BatchSource sampled_batches(const TokenFile& file, const TrainConfig& train);

}  // namespace motley::train
