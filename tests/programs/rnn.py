"""Distributed RNN, the shape of PyTorch's "Getting Started with Distributed
RPC Framework" tutorial (its RNN part): the embedding table lives on "ps"
(rank 1), made with rpc.remote(ps, EmbeddingTable, ...); the LSTM and the
decoder live on the driver ("trainer", rank 0). The forward sends the token
ids to the remote table (_remote_method: rpc_sync to rref.owner() of a
function calling rref.local_value()), runs the LSTM and decoder locally;
distributed autograd carries the gradient back into the table, and
DistributedOptimizer(SGD) steps over RRefs to the remote table's and the
local modules' parameters (local ones are RRef(p) owned by the driver).

Dropout is 0 so that the run is deterministic; `reference()` trains the same
model locally.
"""

import torch
import torch.nn as nn
import torch.optim as optim

from tests.programs.backend import DistributedOptimizer, dist_autograd, rpc

NTOKEN, NINP, NHID, NLAYERS = 10, 4, 8, 2
SEQ_LEN, NINDICES = 5, 3  # (sequence length, batch) of token ids
STEPS = 6
LR = 0.5
DROPOUT = 0.0


# --- helpers from the tutorial --------------------------------------------------


def _call_method(method, rref, *args, **kwargs):
    return method(rref.local_value(), *args, **kwargs)


def _remote_method(method, rref, *args, **kwargs):
    args = [method, rref] + list(args)
    return rpc.rpc_sync(rref.owner(), _call_method, args=args, kwargs=kwargs)


def _parameter_rrefs(module):
    param_rrefs = []
    for param in module.parameters():
        param_rrefs.append(rpc.RRef(param))
    return param_rrefs


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


# --- the model --------------------------------------------------------------------


class EmbeddingTable(nn.Module):
    """Encoding layers of the RNNModel; lives on the parameter server."""

    def __init__(self, ntoken, ninp, dropout, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.encoder.weight.data.uniform_(-0.1, 0.1)

    def forward(self, input):
        return self.drop(self.encoder(input))


class Decoder(nn.Module):
    def __init__(self, ntoken, nhid, dropout):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.decoder.weight.data.uniform_(-0.1, 0.1)
        self.decoder.bias.data.zero_()

    def forward(self, output):
        return self.decoder(self.drop(output))


class RNNModel(nn.Module):
    def __init__(self, ps, ntoken, ninp, nhid, nlayers, dropout=DROPOUT, seed=0):
        super().__init__()
        # setup embedding table remotely
        self.emb_table_rref = rpc.remote(ps, EmbeddingTable, args=(ntoken, ninp, dropout, seed))
        # setup LSTM and decoder locally
        torch.manual_seed(seed + 1)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = Decoder(ntoken, nhid, dropout)

    def forward(self, input, hidden):
        # pass input to the remote embedding table and fetch emb tensor back
        emb = _remote_method(EmbeddingTable.forward, self.emb_table_rref, input)
        output, hidden = self.rnn(emb, hidden)
        return self.decoder(output), hidden

    def parameter_rrefs(self):
        remote_params = []
        # get RRefs of the embedding table
        remote_params.extend(_remote_method(_parameter_rrefs, self.emb_table_rref))
        # create RRefs for the local parameters
        remote_params.extend(_parameter_rrefs(self.rnn))
        remote_params.extend(_parameter_rrefs(self.decoder))
        return remote_params

    def params(self):
        return (_remote_method(_params, self.emb_table_rref) + _params(self.rnn)
                + _params(self.decoder))


def get_next_batch(step: int):
    g = torch.Generator().manual_seed(7 + step)
    data = torch.randint(0, NTOKEN, (SEQ_LEN, NINDICES), generator=g)
    target = torch.randint(0, NTOKEN, (SEQ_LEN * NINDICES,), generator=g)
    return data, target


def init_hidden():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(NLAYERS, NINDICES, NHID, generator=g),
            torch.randn(NLAYERS, NINDICES, NHID, generator=g))


def run_trainer():
    model = RNNModel("ps", NTOKEN, NINP, NHID, NLAYERS)
    # setup distributed optimizer
    opt = DistributedOptimizer(optim.SGD, model.parameter_rrefs(), lr=LR)
    criterion = torch.nn.CrossEntropyLoss()
    hidden = init_hidden()
    losses = []
    for step in range(STEPS):
        data, target = get_next_batch(step)
        # create distributed autograd context
        with dist_autograd.context() as context_id:
            hidden = (hidden[0].detach(), hidden[1].detach())
            output, hidden = model(data, hidden)
            loss = criterion(output.view(-1, NTOKEN), target)
            # run distributed backward pass
            dist_autograd.backward(context_id, [loss])
            # run distributed optimizer
            opt.step(context_id)
            # not necessary to zero grads since they are
            # accumulated into the distributed autograd context
            # which is reset every iteration.
        losses.append(loss.item())
    return {"losses": torch.tensor(losses), "params": model.params()}


def run(rank: int, world_size: int, port: int):
    assert world_size == 2, "rnn: a trainer and a parameter server"
    options = rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=8, rpc_timeout=60, init_method=f"tcp://127.0.0.1:{port}")
    if rank == 1:
        rpc.init_rpc("ps", rank=rank, world_size=world_size, rpc_backend_options=options)
        result = None
    else:
        rpc.init_rpc("trainer", rank=rank, world_size=world_size, rpc_backend_options=options)
        result = run_trainer()
    # block until all rpcs finish
    rpc.shutdown()
    return result


def reference(world_size: int = 2):
    table = EmbeddingTable(NTOKEN, NINP, DROPOUT, 0)
    torch.manual_seed(1)
    rnn = nn.LSTM(NINP, NHID, NLAYERS, dropout=DROPOUT)
    decoder = Decoder(NTOKEN, NHID, DROPOUT)
    modules = [table, rnn, decoder]
    opt = optim.SGD([p for m in modules for p in m.parameters()], lr=LR)
    criterion = torch.nn.CrossEntropyLoss()
    hidden = init_hidden()
    losses = []
    for step in range(STEPS):
        data, target = get_next_batch(step)
        opt.zero_grad()
        hidden = (hidden[0].detach(), hidden[1].detach())
        output, hidden = rnn(table(data), hidden)
        loss = criterion(decoder(output).view(-1, NTOKEN), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"losses": torch.tensor(losses), "params": [p for m in modules for p in _params(m)]}
