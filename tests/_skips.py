import warnings, logging
warnings.simplefilter("ignore"); logging.getLogger("transformers").setLevel(logging.ERROR)
from architecture_walk import check
tries = {
 "xlstm": {"embedding_dim": 32},
 "dory": {"n_input_layers": 1, "n_recurrent_layers": 0, "n_output_layers": 1},
 "dory ": {"num_hidden_layers": 3, "n_input_layers": 1, "n_recurrent_layers": 1, "n_output_layers": 1},
 "qwen4_exp_text": {"token_budget": 8, "compress_ratio": 2},
 "dots1": {"n_shared_experts": 1},
 "bailing_hybrid": {"n_group": 1, "num_group": 1},
}
for t, o in tries.items():
    try:
        print(t, check(t.strip(), **o))
    except Exception as e:
        print(t, "EXC", type(e).__name__, e)
