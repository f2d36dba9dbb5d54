"""Audio models: a wav2vec 2.0 feature extractor, a WaveNet, a 1D U-Net, a CTC speech head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import Entry, floats, inputs, ints

B = 2


class Wav2VecFeatureExtractor(nn.Module):
    """wav2vec 2.0's conv feature encoder (GroupNorm on the first layer, GELU), then the
    feature projection and a contrastive-ish regression head."""

    def __init__(self, channels=32, dim=24):
        super().__init__()
        spec = [(10, 5), (3, 2), (3, 2), (2, 2)]  # (kernel, stride)
        layers = []
        cin = 1
        for i, (k, s) in enumerate(spec):
            block = [nn.Conv1d(cin, channels, k, s, bias=False)]
            if i == 0:
                block.append(nn.GroupNorm(channels, channels))
            block.append(nn.GELU())
            layers.append(nn.Sequential(*block))
            cin = channels
        self.conv_layers = nn.ModuleList(layers)
        self.layer_norm = nn.LayerNorm(channels)
        self.projection = nn.Linear(channels, dim)
        self.dropout = nn.Dropout(0.1)

    def forward(self, waveform):
        x = waveform[:, None]
        for conv in self.conv_layers:
            x = conv(x)
        x = self.layer_norm(x.transpose(1, 2))
        return self.dropout(self.projection(x))


class ResidualLayer(nn.Module):
    def __init__(self, channels, skip, dilation):
        super().__init__()
        self.dilation = dilation
        self.filter = nn.Conv1d(channels, channels, 2, dilation=dilation)
        self.gate = nn.Conv1d(channels, channels, 2, dilation=dilation)
        self.res = nn.Conv1d(channels, channels, 1)
        self.skip = nn.Conv1d(channels, skip, 1)

    def forward(self, x):
        padded = F.pad(x, (self.dilation, 0))  # causal
        z = torch.tanh(self.filter(padded)) * torch.sigmoid(self.gate(padded))
        return x + self.res(z), self.skip(z)


class WaveNet(nn.Module):
    """WaveNet: mu-law class embedding, dilated causal convs, gated tanh*sigmoid, skips."""

    def __init__(self, classes=32, channels=16, skip=24, dilations=(1, 2, 4, 8)):
        super().__init__()
        self.embed = nn.Conv1d(classes, channels, 1)
        self.layers = nn.ModuleList(ResidualLayer(channels, skip, d) for d in dilations)
        self.out1 = nn.Conv1d(skip, skip, 1)
        self.out2 = nn.Conv1d(skip, classes, 1)
        self.classes = classes

    def forward(self, audio):
        x = self.embed(F.one_hot(audio, self.classes).float().transpose(1, 2))
        skips = 0
        for layer in self.layers:
            x, s = layer(x)
            skips = skips + s
        logits = self.out2(F.relu(self.out1(F.relu(skips))))
        return F.cross_entropy(logits[:, :, :-1], audio[:, 1:])


class UNet1d(nn.Module):
    """1D U-Net for speech enhancement: strided conv down, ConvTranspose1d up, skip concat."""

    def __init__(self, ch=(8, 16, 32)):
        super().__init__()
        self.down = nn.ModuleList()
        cin = 1
        for c in ch:
            self.down.append(nn.Sequential(nn.Conv1d(cin, c, 4, 2, 1), nn.BatchNorm1d(c),
                                           nn.LeakyReLU(0.2)))
            cin = c
        # up path: (in = previous up + skip, out); the last skip is the 1-channel input
        self.up = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose1d(cin, cout, 4, 2, 1), nn.ReLU())
            for cin, cout in [(ch[2], ch[1]), (2 * ch[1], ch[0]), (2 * ch[0], ch[0])])
        self.final = nn.Conv1d(ch[0] + 1, 1, 1)

    def forward(self, noisy, clean):
        skips = []
        x = noisy
        for d in self.down:
            skips.append(x)
            x = d(x)
        for u in self.up:
            x = u(x)
            x = torch.cat([x, skips.pop()], dim=1)
        return F.l1_loss(self.final(x), clean)


class CTCSpeech(nn.Module):
    """Conv front end, bidirectional LSTM, log-softmax over characters, CTC loss."""

    def __init__(self, mels=16, hidden=16, chars=12):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(mels, hidden, 3, padding=1), nn.ReLU())
        self.rnn = nn.LSTM(hidden, hidden, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(2 * hidden, chars)
        self.ctc = nn.CTCLoss(blank=0)

    def forward(self, mel, targets):
        x = self.conv(mel).transpose(1, 2)
        x, _ = self.rnn(x)
        log_probs = F.log_softmax(self.fc(x), dim=-1).transpose(0, 1)  # (T, B, C)
        # full-length utterances and transcripts; lengths as Python ints (with tensors the
        # meta device has no kernel for ctc_loss, so neither export nor FlopCounterMode runs)
        input_lengths = [log_probs.size(0)] * log_probs.size(1)
        target_lengths = [targets.size(1)] * targets.size(0)
        return self.ctc(log_probs, targets, input_lengths, target_lengths)


def mulaw(device, dtype):
    return torch.randint(0, 32, (B, 64), device=device)


ENTRIES = [
    Entry("wav2vec_features", "audio", Wav2VecFeatureExtractor, inputs(floats(B, 400)),
          "conv1d stack, GroupNorm, GELU, LayerNorm, dropout; features output"),
    Entry("wavenet", "audio", WaveNet, inputs(mulaw),
          "dilated causal conv1d (F.pad), gated tanh*sigmoid, skip sum, one_hot input"),
    Entry("unet1d", "audio", UNet1d, inputs(floats(B, 1, 64), floats(B, 1, 64)),
          "strided conv1d down, ConvTranspose1d up, skip concatenation, BatchNorm1d, L1 loss"),
    Entry("ctc_speech", "audio", CTCSpeech, inputs(floats(B, 16, 20), ints(12, B, 6)),
          "conv1d + BiLSTM + nn.CTCLoss (lengths as Python ints)"),
]
