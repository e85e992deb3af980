// compressor.cpp — compressor_feed, the compressor state machine (rules in compressor.h).
#include "ref/compressor.h"

#include <algorithm>
#include <vector>

namespace megamoe {

using Buf = std::vector<float>;

void compressor_feed(const Compressor& w, const ModelConfig& c, const ops::RopeTable& rope, bool indexer_keys,
                     const float* kv, const float* gate, const int64_t* pos, int64_t n, CompressorState& st,
                     Numerics nm) {
    const int64_t r = w.ratio, d = w.dim, width = (w.overlap ? 2 : 1) * d;
    const float* ape = w.ape.as<float>();
    for (int64_t i = 0; i < n; ++i) {
        st.pending_kv.insert(st.pending_kv.end(), kv + i * width, kv + (i + 1) * width);
        for (int64_t f = 0; f < width; ++f) st.pending_gate.push_back(gate[i * width + f] + ape[(pos[i] % r) * width + f]);
        ++st.n_pending;
    }
    std::vector<const float*> kv_slots, gate_slots;
    Buf row(static_cast<size_t>(d));
    while (st.n_pending >= r) {
        kv_slots.clear();
        gate_slots.clear();
        if (w.overlap) {
            // Row w pools series A of window w-1 (absent before the first window: weight 0)
            // and series B of window w, per channel, in one softmax over 2r slots.
            for (int64_t s = 0; s < r && !st.prev_kv.empty(); ++s) {
                kv_slots.push_back(st.prev_kv.data() + s * d);
                gate_slots.push_back(st.prev_gate.data() + s * d);
            }
            for (int64_t s = 0; s < r; ++s) {
                kv_slots.push_back(st.pending_kv.data() + s * width + d);
                gate_slots.push_back(st.pending_gate.data() + s * width + d);
            }
        } else {
            for (int64_t s = 0; s < r; ++s) {
                kv_slots.push_back(st.pending_kv.data() + s * width);
                gate_slots.push_back(st.pending_gate.data() + s * width);
            }
        }
        ops::compress_pool(kv_slots.data(), gate_slots.data(), static_cast<int64_t>(kv_slots.size()), d, row.data());
        ops::round_bf16(nm, row.data(), d);   // official: kv.to(x.dtype) before the norm
        ops::rms_norm(row.data(), 1, d, &w.norm, static_cast<float>(c.rms_norm_eps), row.data());
        ops::round_bf16(nm, row.data(), d);
        const int64_t first_pos = st.n_rows * r;   // rows are rotated at their window's first token
        ops::rope(row.data(), 1, 1, d, &first_pos, rope, false);
        ops::round_bf16(nm, row.data(), d);
        if (indexer_keys)
            ops::round_indexer_qk(nm, row.data(), 1, d);
        else
            ops::round_kv_latent(nm, row.data(), 1, d, rope.rope_dim);
        st.rows.insert(st.rows.end(), row.begin(), row.end());
        ++st.n_rows;
        if (w.overlap) {
            st.prev_kv.resize(static_cast<size_t>(r * d));
            st.prev_gate.resize(static_cast<size_t>(r * d));
            for (int64_t s = 0; s < r; ++s) {
                std::copy_n(st.pending_kv.data() + s * width, d, st.prev_kv.data() + s * d);
                std::copy_n(st.pending_gate.data() + s * width, d, st.prev_gate.data() + s * d);
            }
        }
        st.pending_kv.erase(st.pending_kv.begin(), st.pending_kv.begin() + r * width);
        st.pending_gate.erase(st.pending_gate.begin(), st.pending_gate.begin() + r * width);
        st.n_pending -= r;
    }
}

}  // namespace megamoe
