"""Each method's math in two lines, for reports: the registry attaches them to the method entries.

``tunelab methods`` prints the one-line ``summary``; reports print these notes (equation, paper,
trainable parameters, mergeability). One source: the report reads ``registry.get(name).notes``.
"""

METHOD_NOTES = {
    "coop": "CoOp (Zhou et al., 2022): M learnable context vectors replace the hand-written prompt words of a "
            "CLIP text prompt, t_c = [V1..VM, class c]; p(y=c|x) = softmax_c(τ·cos(f(x), g(t_c))). Only M·d_text "
            "parameters train, on the text side.",
    "vpt": "VPT (Jia et al., 2022): N learnable tokens join the vision transformer's input sequence (shallow) or "
           "are replaced at every layer (deep); the frozen text side supplies the class weights.",
    "maple": "MaPLe (Khattak et al., 2023): text prompts P_j at the first J layers of CLIP's text encoder and "
             "vision prompts F_j(P_j) at the same vision layers, F_j a learned linear coupling, so both branches "
             "adapt together.",
    "full": "Full fine-tuning: every weight W is updated, W ← W − η ∇L(W). The reference point: the most "
            "trainable parameters and the most memory (weights, gradients and two AdamW moments for all of them).",
    "lora": "LoRA (Hu et al., 2021): a frozen weight W gets a trainable low-rank update, "
            "h = W x + (α/r)·B A x with A ∈ ℝ^{r×d_in}, B ∈ ℝ^{d_out×r}, B = 0 at init so training starts "
            "from the base model. Trains r·(d_in + d_out) parameters per adapted matrix instead of d_in·d_out, "
            "and can be merged into W after training (no inference cost).",
    "qlora": "QLoRA (Dettmers et al., 2023): LoRA over a frozen base stored as 4-bit NormalFloat — blocks of 64 "
             "weights scaled by their absmax onto 16 normal-quantile levels, the absmax constants themselves 8-bit "
             "(double quantization): 4 + 8/64 + 32/(64·256) ≈ 4.13 bits per weight instead of 32. Same trainable "
             "parameters as LoRA; the base is dequantized just in time for each matmul.",
    "dora": "DoRA (Liu et al., 2024): W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_row — LoRA moves the direction, a trainable "
            "magnitude vector m (one per output feature) sets the length; the norm is detached in backprop. "
            "r·(d_in + d_out) + d_out parameters per matrix; mergeable.",
    "lora_mixture": "Learned mixture of LoRA experts: per layer a gate z over k frozen experts, "
                    "h = W x + Σ_i softmax(z)_i·s_i B_i A_i x; only k numbers per layer train; mergeable.",
    "prompt_tuning": "Prompt tuning (Lester et al., 2021): n trainable virtual token embeddings P ∈ ℝ^{n×d} are "
                     "prepended to the input embeddings, [P; E(x)]; the model stays frozen. n·d parameters; strongest "
                     "on large models, weak on small ones and on sequence tagging.",
    "prefix_tuning": "Prefix tuning (Li & Liang, 2021): n trainable key/value vectors at every attention layer, "
                     "softmax(Q[K_P; K]ᵀ/√d)[V_P; V]; trained through a reparameterization MLP P = MLP(E) that is "
                     "folded away after training. n·L·2·d_kv parameters at inference.",
    "p_tuning_v2": "P-Tuning v2 (Liu et al., 2022): deep key/value prompts at every layer (prefix tuning's "
                   "mechanism) plus a trained linear head, no verbalizer; closes most of the gap to fine-tuning on "
                   "small models and on sequence tagging, where input-only prompts fail.",
    "ia3": "(IA)³ (Liu et al., 2022, T-Few): learned vectors rescale keys, values and the feed-forward "
           "activation, k' = l_k ⊙ W_k x, v' = l_v ⊙ W_v x, y = W_down (l_ff ⊙ h); ones at init, folded into W "
           "after training. One number per adapted feature: the fewest parameters of the family.",
    "bottleneck": "Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021): h' = h + W_up act(W_down h) "
                  "after the attention and feed-forward sub-layers (Houlsby) or after the feed-forward only "
                  "(Pfeiffer); W_up = 0 at init. 2·d·d/reduction_factor per adapter; non-linear, so not mergeable.",
    "compacter": "Compacter (Karimi Mahabadi et al., 2021): bottleneck adapters whose projections are "
                 "W = Σᵢ Aᵢ ⊗ sᵢtᵢᵀ, with n×n slow matrices Aᵢ shared by all layers and rank-one fast weights; "
                 "n³ + 4L(k + d) parameters (Compacter++, feed-forward only: n³ + 2L(k + d)).",
}
