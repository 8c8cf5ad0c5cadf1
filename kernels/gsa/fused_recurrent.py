def fused_recurrent_gsa(*a, **k): raise NotImplementedError
