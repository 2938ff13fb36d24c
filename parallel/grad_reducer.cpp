#include "parallel/grad_reducer.h"

#include <algorithm>

#include "core/ops.h"
#include "layers/optimizer.h"
#include "layers/parameter_layout.h"

namespace motley::parallel {

bool is_expert_param(const std::string& name) {
  return name.find(".moe.experts.") != std::string::npos;
}

bool is_gru_param(const std::string& name) { return name.rfind("moe_gru.", 0) == 0; }

GradReducer::GradReducer(ParameterSet& params, const ProcessGroups& groups,
                         std::int64_t bucket_elements)
    : params_(params) {
  const std::vector<autograd::Variable>& all = params.all();
  // Open bucket per kind (0 dense, 1 expert); see Note [Collective order].
  struct Open {
    std::vector<std::size_t> members;
    std::int64_t numel = 0;
  };
  Open open[2];
  std::vector<std::pair<int, std::vector<std::size_t>>> closed;
  auto close = [&](int kind) {
    if (open[kind].members.empty()) return;
    closed.emplace_back(kind, std::move(open[kind].members));
    open[kind] = Open{};
  };
  for (std::size_t i = all.size(); i-- > 0;) {
    const int kind = is_expert_param(all[i].name()) ? 1 : 0;
    open[kind].members.push_back(i);
    open[kind].numel += all[i].numel();
    if (open[kind].numel >= bucket_elements) close(kind);
  }
  close(0);
  close(1);
  for (auto& [kind, members] : closed) {
    Bucket b;
    b.comm = kind == 1 ? &groups.expert_dp() : &groups.dp();
    std::int64_t numel = 0;
    for (std::size_t i : members) numel += all[i].numel();
    b.flat = Tensor::zeros({numel}, params.dtype(), params.device());
    std::int64_t offset = 0;
    for (std::size_t i : members) {
      autograd::Variable p = all[i];
      Tensor view = b.flat.narrow(0, offset, p.numel()).view(p.shape());
      if (p.grad().defined()) view.copy_(p.grad());
      p.set_grad(view);
      offset += p.numel();
    }
    b.params = std::move(members);
    buckets_.push_back(std::move(b));
  }
  for (std::size_t k = 0; k < buckets_.size(); ++k) {
    for (std::size_t i : buckets_[k].params) {
      autograd::Variable p = all[i];
      p.register_grad_hook([this, k](autograd::Variable&) { on_ready(k); });
    }
  }
}

GradReducer::~GradReducer() {
  for (const autograd::Variable& p : params_.all()) {
    autograd::Variable v = p;
    v.clear_grad_hooks();
  }
}

void GradReducer::arm() {
  armed_ = true;
  next_launch_ = 0;
  for (Bucket& b : buckets_) b.ready = 0;
}

void GradReducer::on_ready(std::size_t bucket) {
  if (!armed_) return;
  ++buckets_[bucket].ready;
  launch_ready();
}

void GradReducer::launch_ready() {
  while (next_launch_ < buckets_.size() &&
         buckets_[next_launch_].ready >= buckets_[next_launch_].params.size()) {
    Bucket& b = buckets_[next_launch_++];
    pending_.push_back(b.comm->iallreduce_sum(b.flat));
  }
}

void GradReducer::finish() {
  while (next_launch_ < buckets_.size()) {
    Bucket& b = buckets_[next_launch_++];
    pending_.push_back(b.comm->iallreduce_sum(b.flat));
  }
  wait_all(pending_);
  armed_ = false;
}

void reduce_shared_gru(ParameterSet& params, const ProcessGroups& groups,
                       const ModelConfig& config) {
  // The cell's tensors, as Note [Parameter layout] describes them.
  std::vector<std::pair<std::string, Shape>> parts;
  for (const ParameterSpec& spec : gru_cell_layout(config))
    parts.emplace_back(spec.name, spec.shape);
  const DType dtype = params.dtype();
  std::int64_t numel = 0;
  for (const auto& part : parts) numel += shape_numel(part.second);
  Tensor flat = Tensor::zeros({numel}, dtype, params.device());
  std::int64_t offset = 0;
  for (const auto& [name, shape] : parts) {
    const std::int64_t n = shape_numel(shape);
    if (params.contains(name) && params.get(name).grad().defined()) {
      flat.narrow(0, offset, n).copy_(params.get(name).grad().reshape({n}));
    }
    offset += n;
  }
  groups.pp().allreduce_sum(flat);
  offset = 0;
  for (const auto& [name, shape] : parts) {
    const std::int64_t n = shape_numel(shape);
    if (params.contains(name)) {
      autograd::Variable v = params.get(name);
      if (v.grad().defined()) {
        Tensor g = v.grad();
        g.copy_(flat.narrow(0, offset, n).view(shape));
      } else {
        v.set_grad(flat.narrow(0, offset, n).view(shape).clone());
      }
    }
    offset += n;
  }
}

double global_grad_sum_of_squares(const ParameterSet& params, const ProcessGroups& groups,
                                  int gru_stage) {
  const RankCoords& c = groups.coords();
  std::vector<Tensor> counted_grads;
  for (const autograd::Variable& p : params.all()) {
    if (!p.grad().defined()) continue;
    bool counted;
    if (is_expert_param(p.name())) {
      counted = c.dp_rank < groups.layout().ep;
    } else if (is_gru_param(p.name())) {
      counted = c.dp_rank == 0 && c.pp_rank == gru_stage;
    } else {
      counted = c.dp_rank == 0;
    }
    if (counted) counted_grads.push_back(p.grad());
  }
  const double local = sum_of_squares(counted_grads);  // one host round trip
  Tensor t = Tensor::from_vector(std::vector<double>{local}, {1});
  groups.host().allreduce_sum(t);
  return t.to_vector<double>()[0];
}

}  // namespace motley::parallel
