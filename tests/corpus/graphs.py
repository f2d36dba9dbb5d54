"""Graph neural nets (message passing with index_add_, a dense normalised adjacency), a
top-k mixture of experts written with topk/one_hot/gather, a cdist k-nearest-neighbour layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import Entry, floats, inputs, ints

N, E, F_IN = 12, 30, 8


class MPNNLayer(nn.Module):
    """Gilmer et al.'s message passing: messages from (h_src, h_dst, edge features), summed into
    the destination with index_add_, a GRU-cell update."""

    def __init__(self, d, e):
        super().__init__()
        self.message = nn.Sequential(nn.Linear(2 * d + e, d), nn.ReLU(), nn.Linear(d, d))
        self.update = nn.GRUCell(d, d)

    def forward(self, h, edge_index, edge_attr):
        src, dst = edge_index
        m = self.message(torch.cat([h[src], h[dst], edge_attr], dim=-1))
        agg = torch.zeros_like(h).index_add_(0, dst, m)
        return self.update(agg, h)


class MPNN(nn.Module):
    def __init__(self, d=16, e=4, steps=2):
        super().__init__()
        self.embed = nn.Linear(F_IN, d)
        self.layers = nn.ModuleList(MPNNLayer(d, e) for _ in range(steps))
        self.readout = nn.Linear(d, 1)

    def forward(self, x, edge_index, edge_attr, y):
        h = F.relu(self.embed(x))
        for layer in self.layers:
            h = layer(h, edge_index, edge_attr)
        return F.mse_loss(self.readout(h.sum(0)), y)


def graph_inputs(device, dtype):
    return (torch.randn(N, F_IN, device=device, dtype=dtype),
            torch.randint(0, N, (2, E), device=device),
            torch.randn(E, 4, device=device, dtype=dtype),
            torch.randn(1, device=device, dtype=dtype))


class GCNLayer(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x, adj_norm):
        return adj_norm @ self.linear(x) + self.bias


class GCN(nn.Module):
    """Kipf & Welling's GCN on a batch of dense adjacency matrices: D^-1/2 (A + I) D^-1/2,
    node classification with dropout."""

    def __init__(self, hidden=16, classes=4):
        super().__init__()
        self.gc1 = GCNLayer(F_IN, hidden)
        self.gc2 = GCNLayer(hidden, classes)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x, adj, labels):
        a = adj + torch.eye(adj.size(-1), device=adj.device)
        d = a.sum(-1).pow(-0.5)
        a = d.unsqueeze(-1) * a * d.unsqueeze(-2)
        h = self.dropout(F.relu(self.gc1(x, a)))
        logits = self.gc2(h, a)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))


def dense_graph_inputs(device, dtype):
    adj = (torch.rand(2, N, N, device=device) > 0.7).to(dtype)
    adj = ((adj + adj.transpose(1, 2)) > 0).to(dtype)
    return (torch.randn(2, N, F_IN, device=device, dtype=dtype), adj,
            torch.randint(0, 4, (2, N), device=device))


class Expert(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class DenseTopKMoE(nn.Module):
    """A top-2 mixture of experts written without data-dependent shapes: every expert runs on
    every token, the router's top-k choices are scattered into a dense gate matrix with one_hot
    and gathered back; a Switch-style load-balancing loss."""

    def __init__(self, d=16, hidden=32, experts=4, k=2):
        super().__init__()
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(Expert(d, hidden) for _ in range(experts))
        self.k = k
        self.n = experts

    def forward(self, x):
        probs = F.softmax(self.router(x), dim=-1)  # (tokens, E)
        top_p, top_i = probs.topk(self.k, dim=-1)
        top_p = top_p / top_p.sum(-1, keepdim=True)
        gates = (F.one_hot(top_i, self.n).to(x.dtype) * top_p.unsqueeze(-1)).sum(1)  # (tokens, E)
        expert_out = torch.stack([e(x) for e in self.experts], dim=1)  # (tokens, E, d)
        chosen = torch.gather(expert_out, 1, top_i.unsqueeze(-1).expand(-1, -1, x.size(-1)))
        y = (chosen * top_p.unsqueeze(-1)).sum(1)
        load = gates.gt(0).to(x.dtype).mean(0)
        aux = self.n * (load * probs.mean(0)).sum()
        return y, aux


class MoEClassifier(nn.Module):
    def __init__(self, d=16, classes=5):
        super().__init__()
        self.inp = nn.Linear(F_IN, d)
        self.moe = DenseTopKMoE(d)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, classes)

    def forward(self, x, y):
        h = self.inp(x)
        moe_out, aux = self.moe(h)
        h = self.norm(h + moe_out)
        return F.cross_entropy(self.out(h), y) + 0.01 * aux


class KNNFeatures(nn.Module):
    """DGCNN-style edge features: cdist, topk neighbours, gather their features, an edge MLP,
    max over neighbours; point-cloud classification."""

    def __init__(self, k=4, d=16, classes=3):
        super().__init__()
        self.k = k
        self.edge_mlp = nn.Sequential(nn.Linear(6, d), nn.ReLU(), nn.Linear(d, d))
        self.head = nn.Linear(d, classes)

    def forward(self, points, labels):  # points (B, P, 3)
        dist = torch.cdist(points, points)
        idx = dist.topk(self.k, dim=-1, largest=False).indices  # (B, P, k)
        b, p, _ = points.shape
        neighbours = torch.gather(points.unsqueeze(1).expand(b, p, p, 3), 2,
                                  idx.unsqueeze(-1).expand(b, p, self.k, 3))
        centre = points.unsqueeze(2).expand_as(neighbours)
        edge = self.edge_mlp(torch.cat([centre, neighbours - centre], dim=-1))
        feat = edge.max(dim=2).values.mean(1)
        return F.cross_entropy(self.head(feat), labels)


class PointScale(nn.Module):
    """KNNFeatures on learnably scaled points, so cdist itself needs a gradient."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.knn = KNNFeatures()

    def forward(self, points, labels):
        return self.knn(points * self.scale, labels)


ENTRIES = [
    Entry("mpnn_index_add", "graph", MPNN, graph_inputs,
          "message passing: h[src] gathers, index_add_ into destinations, GRUCell update"),
    Entry("gcn_dense", "graph", GCN, dense_graph_inputs,
          "dense normalised adjacency matmul, dropout"),
    Entry("moe_topk_dense", "moe", MoEClassifier, inputs(floats(16, F_IN), ints(5, 16)),
          "top-2 routing with topk, one_hot gates, gather of the chosen experts, aux loss"),
    Entry("knn_cdist", "misc", PointScale, inputs(floats(2, 10, 3), ints(3, 2)),
          "torch.cdist, topk neighbours, gather, max over neighbours"),
]
