"""Recurrent and scan models: nn.LSTM / nn.GRU / nn.RNN, an LSTMCell loop, a GRU seq2seq, a
Mamba-style selective scan and a causal linear-attention model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import Entry, floats, inputs, ints

V, B, T = 50, 2, 8


class LSTMClassifier(nn.Module):
    """Sentiment-classifier style: embedding, 2-layer LSTM (batch_first), last hidden state."""

    def __init__(self, vocab=V, emb=16, hidden=24, classes=3):
        super().__init__()
        self.embedding = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, num_layers=2, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, tokens, labels):
        x = self.embedding(tokens)
        out, (h, c) = self.lstm(x)
        logits = self.fc(h[-1])
        return F.cross_entropy(logits, labels)


class BiGRUTagger(nn.Module):
    """Sequence tagger: bidirectional GRU over (T, B, F) input (batch_first=False)."""

    def __init__(self, features=12, hidden=16, tags=5):
        super().__init__()
        self.gru = nn.GRU(features, hidden, bidirectional=True)
        self.out = nn.Linear(2 * hidden, tags)

    def forward(self, x, tags):
        h, _ = self.gru(x)  # (T, B, 2H)
        logits = self.out(h)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), tags.view(-1))


class ElmanRNN(nn.Module):
    """nn.RNN (tanh) regressor on (B, T, F), predicting the next value at every step."""

    def __init__(self, features=8, hidden=20):
        super().__init__()
        self.rnn = nn.RNN(features, hidden, num_layers=2, batch_first=True, nonlinearity="tanh")
        self.head = nn.Linear(hidden, 1)

    def forward(self, x, y):
        h, _ = self.rnn(x)
        return F.mse_loss(self.head(h).squeeze(-1), y)


class LSTMCellLM(nn.Module):
    """Character LM unrolled by hand with nn.LSTMCell, one step at a time."""

    def __init__(self, vocab=V, emb=16, hidden=24):
        super().__init__()
        self.hidden = hidden
        self.embed = nn.Embedding(vocab, emb)
        self.cell = nn.LSTMCell(emb, hidden)
        self.proj = nn.Linear(hidden, vocab)

    def forward(self, tokens, targets):
        b, t = tokens.shape
        h = torch.zeros(b, self.hidden, device=tokens.device)
        c = torch.zeros(b, self.hidden, device=tokens.device)
        emb = self.embed(tokens)
        outputs = []
        for i in range(t):
            h, c = self.cell(emb[:, i], (h, c))
            outputs.append(h)
        logits = self.proj(torch.stack(outputs, dim=1))
        return F.cross_entropy(logits.reshape(b * t, -1), targets.reshape(-1))


class Encoder(nn.Module):
    def __init__(self, vocab, emb, hidden):
        super().__init__()
        self.embedding = nn.Embedding(vocab, emb)
        self.gru = nn.GRU(emb, hidden, batch_first=True)

    def forward(self, src):
        outputs, hidden = self.gru(self.embedding(src))
        return outputs, hidden


class AttnDecoder(nn.Module):
    """Bahdanau-style decoder step (the PyTorch seq2seq tutorial's), teacher-forced."""

    def __init__(self, vocab, emb, hidden):
        super().__init__()
        self.embedding = nn.Embedding(vocab, emb)
        self.Wa = nn.Linear(hidden, hidden)
        self.Ua = nn.Linear(hidden, hidden)
        self.Va = nn.Linear(hidden, 1)
        self.gru = nn.GRU(emb + hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward_step(self, token, hidden, enc_out):
        embedded = self.embedding(token)  # (B, 1, E)
        query = hidden.permute(1, 0, 2)  # (B, 1, H)
        scores = self.Va(torch.tanh(self.Wa(query) + self.Ua(enc_out)))  # (B, S, 1)
        weights = F.softmax(scores.squeeze(2).unsqueeze(1), dim=-1)  # (B, 1, S)
        context = torch.bmm(weights, enc_out)
        output, hidden = self.gru(torch.cat((embedded, context), dim=2), hidden)
        return self.out(output), hidden

    def forward(self, enc_out, enc_hidden, target):
        hidden = enc_hidden
        logits = []
        for i in range(target.size(1)):
            step_logits, hidden = self.forward_step(target[:, i:i + 1], hidden, enc_out)
            logits.append(step_logits)
        return torch.cat(logits, dim=1)


class Seq2Seq(nn.Module):
    def __init__(self, vocab=V, emb=12, hidden=16):
        super().__init__()
        self.encoder = Encoder(vocab, emb, hidden)
        self.decoder = AttnDecoder(vocab, emb, hidden)

    def forward(self, src, tgt_in, tgt_out):
        enc_out, enc_hidden = self.encoder(src)
        logits = self.decoder(enc_out, enc_hidden, tgt_in)
        return F.nll_loss(F.log_softmax(logits, dim=-1).view(-1, logits.size(-1)), tgt_out.view(-1))


class SelectiveSSM(nn.Module):
    """Mamba-style selective state space layer; the scan written in closed form with cumsum:
    h_t = sum_{s<=t} exp(sum_{s<r<=t} dt_r A) dt_s B_s x_s, y_t = C_t h_t + D x_t."""

    def __init__(self, d_model=16, d_state=8, expand=2, conv=4):
        super().__init__()
        d_inner = expand * d_model
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, conv, groups=d_inner, padding=conv - 1)
        self.x_proj = nn.Linear(d_inner, 1 + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(1, d_inner)
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.d_state = d_state

    def forward(self, x):
        b, t, _ = x.shape
        xz = self.in_proj(x)
        x, z = xz.chunk(2, dim=-1)
        x = self.conv1d(x.transpose(1, 2))[..., :t].transpose(1, 2)
        x = F.silu(x)
        dt, B, C = torch.split(self.x_proj(x), [1, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt))  # (b, t, d)
        A = -torch.exp(self.A_log)  # (d, n)
        dA = torch.einsum("btd,dn->btdn", dt, A)
        cum = torch.cumsum(dA, dim=1)  # (b, t, d, n)
        # decay[t, s] = exp(cum_t - cum_s) for s <= t
        decay = torch.exp(cum.unsqueeze(2) - cum.unsqueeze(1))  # (b, t, s, d, n)
        mask = torch.tril(torch.ones(t, t, device=x.device, dtype=torch.bool))
        decay = decay.masked_fill(~mask[None, :, :, None, None], 0.0)
        dBx = torch.einsum("btd,btn,btd->btdn", dt, B, x)
        h = torch.einsum("btsdn,bsdn->btdn", decay, dBx)
        y = torch.einsum("btdn,btn->btd", h, C) + x * self.D
        y = y * F.silu(z)
        return self.out_proj(y)


class MambaLM(nn.Module):
    def __init__(self, vocab=V, d_model=16, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.layers = nn.ModuleList(SelectiveSSM(d_model) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(layers))
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, ids, targets):
        h = self.embed(ids)
        for norm, layer in zip(self.norms, self.layers):
            h = h + layer(norm(h))
        logits = self.head(h)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class LinearAttention(nn.Module):
    """Causal linear attention (Katharopoulos et al. 2020): phi(x) = elu(x) + 1, prefix sums."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        kv = torch.cumsum(torch.einsum("bthd,bthe->bthde", k, v), dim=1)
        z = 1.0 / (torch.einsum("bthd,bthd->bth", q, torch.cumsum(k, dim=1)) + 1e-6)
        out = torch.einsum("bthd,bthde,bth->bthe", q, kv, z)
        return self.proj(out.reshape(b, t, d))


class LinearTransformer(nn.Module):
    def __init__(self, vocab=V, dim=32, layers=2):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"ln1": nn.LayerNorm(dim), "attn": LinearAttention(dim),
                           "ln2": nn.LayerNorm(dim),
                           "mlp": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(),
                                                nn.Linear(4 * dim, dim))})
            for _ in range(layers))
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, ids, targets):
        x = self.tok(ids) * math.sqrt(self.tok.embedding_dim)
        for blk in self.blocks:
            x = x + blk["attn"](blk["ln1"](x))
            x = x + blk["mlp"](blk["ln2"](x))
        return F.cross_entropy(self.lm_head(x).view(-1, self.lm_head.out_features), targets.view(-1))


ENTRIES = [
    Entry("lstm_classifier", "recurrent", LSTMClassifier, inputs(ints(V, B, T), ints(3, B)),
          "nn.LSTM, 2 layers, batch_first"),
    Entry("bigru_tagger", "recurrent", BiGRUTagger, inputs(floats(T, B, 12), ints(5, T, B)),
          "nn.GRU bidirectional, batch_first=False"),
    Entry("elman_rnn", "recurrent", ElmanRNN, inputs(floats(B, T, 8), floats(B, T)),
          "nn.RNN tanh, 2 layers, batch_first"),
    Entry("lstmcell_lm", "recurrent", LSTMCellLM, inputs(ints(V, B, T), ints(V, B, T)),
          "nn.LSTMCell unrolled in a Python loop"),
    Entry("seq2seq_gru_attn", "recurrent", Seq2Seq,
          inputs(ints(V, B, T), ints(V, B, 5), ints(V, B, 5)),
          "GRU encoder, additive-attention GRU decoder, teacher forcing"),
    Entry("mamba_scan", "state-space", MambaLM, inputs(ints(V, B, T), ints(V, B, T)),
          "selective scan via einsum + cumsum + exp, depthwise causal conv1d"),
    Entry("linear_attention", "attention", LinearTransformer, inputs(ints(V, B, T), ints(V, B, T)),
          "elu+1 feature map, cumsum prefix sums"),
]
