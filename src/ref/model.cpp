// model.cpp — loading a DeepSeek-V4 checkpoint into a Model (the forward is in forward.cpp).
#include "ref/model.h"

namespace megamoe {

std::unique_ptr<Model> Model::load(const std::string& dir, const std::function<void(size_t, size_t)>& progress) {
    auto m = std::make_unique<Model>();
    m->cfg = load_model_config(dir);
    m->checkpoint = std::make_unique<Checkpoint>(dir);
    m->w = bind_weights(m->cfg, *m->checkpoint, progress);
    m->rope_main = ops::make_rope_table(m->cfg.rope_theta, m->cfg.qk_rope_head_dim, nullptr);
    m->rope_compress = ops::make_rope_table(m->cfg.compress_rope_theta, m->cfg.qk_rope_head_dim, &m->cfg.yarn);
    return m;
}

}  // namespace megamoe
