from torch import nn
class MultiheadAttention(nn.MultiheadAttention):
    pass
