"""Agent with remote observers, the shape of PyTorch's "Getting Started with
Distributed RPC Framework" tutorial (its REINFORCE part), without gym: each
observer steps a tiny fake environment.

The agent (rank 0) creates one Observer per observer worker with
rpc.remote(WorkerInfo, Observer) and hands them `RRef(self)`; per episode it
runs every observer's episode at once (rpc_async to ob_rref.owner()), and
each observer calls back into the agent through that RRef (select_action,
report_reward: rpc_sync to agent_rref.owner() of a function calling
agent_rref.local_value()). The agent then takes a local policy-gradient
step (plain torch.optim, no distributed autograd, as in the tutorial).

Deterministic despite the concurrent observers: each observer's environment
and action sampling use their own seeded generators; `reference()` plays the
same episodes locally.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

from tests.programs.backend import rpc

AGENT_NAME = "agent"
OBSERVER_NAME = "obs{}"
EPISODES = 3
N_STEPS = 8
GAMMA = 0.9
LR = 1e-2
EPS = float(torch.finfo(torch.float32).eps)


def _call_method(method, rref, *args, **kwargs):
    return method(rref.local_value(), *args, **kwargs)


def _remote_method(method, rref, *args, **kwargs):
    args = [method, rref] + list(args)
    return rpc.rpc_sync(rref.owner(), _call_method, args=args, kwargs=kwargs)


class FakeEnv:
    """4 random features; reward 1 when the action is (feature 0 > 0)."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        self.state = None

    def reset(self):
        self.state = torch.randn(4, generator=self.g)
        return self.state

    def step(self, action: int):
        reward = 1.0 if action == int(self.state[0] > 0) else 0.0
        self.state = torch.randn(4, generator=self.g)
        return self.state, reward, False


class Policy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.affine1 = nn.Linear(4, 16)
        self.affine2 = nn.Linear(16, 2)

    def forward(self, x):
        x = F.relu(self.affine1(x))
        return F.softmax(self.affine2(x), dim=1)


class Observer:
    def __init__(self):
        self.id = rpc.get_worker_info().id
        self.env = FakeEnv(seed=self.id)

    def run_episode(self, agent_rref, n_steps):
        state = self.env.reset()
        for _ in range(n_steps):
            # send the state to the agent to get an action
            action = _remote_method(Agent.select_action, agent_rref, self.id, state)
            # apply the action to the environment, and get the reward
            state, reward, done = self.env.step(action)
            # report the reward to the agent for training purpose
            _remote_method(Agent.report_reward, agent_rref, self.id, reward)
            if done:
                break


class Learner:
    """The agent's learning part; Agent adds the RPC wiring."""

    def __init__(self, ob_ids):
        self.policy = Policy()
        self.optimizer = optim.Adam(self.policy.parameters(), lr=LR)
        self.rewards = {i: [] for i in ob_ids}
        self.saved_log_probs = {i: [] for i in ob_ids}
        self.generators = {i: torch.Generator().manual_seed(100 + i) for i in ob_ids}

    def select_action(self, ob_id, state):
        probs = self.policy(state.float().unsqueeze(0))
        action = torch.multinomial(probs, 1, generator=self.generators[ob_id])
        self.saved_log_probs[ob_id].append(torch.log(probs[0, action[0, 0]]))
        return action.item()

    def report_reward(self, ob_id, reward):
        self.rewards[ob_id].append(reward)

    def finish_episode(self):
        # joins probs and rewards from different observers into lists
        R, probs, rewards = 0, [], []
        for ob_id in sorted(self.rewards):
            probs.extend(self.saved_log_probs[ob_id])
            rewards.extend(self.rewards[ob_id])
        total = sum(rewards)
        # clear saved probs and rewards
        for ob_id in self.rewards:
            self.rewards[ob_id] = []
            self.saved_log_probs[ob_id] = []
        policy_loss, returns = [], []
        for r in rewards[::-1]:
            R = r + GAMMA * R
            returns.insert(0, R)
        returns = torch.tensor(returns)
        returns = (returns - returns.mean()) / (returns.std() + EPS)
        for log_prob, R in zip(probs, returns):
            policy_loss.append(-log_prob * R)
        self.optimizer.zero_grad()
        policy_loss = torch.stack(policy_loss).sum()
        policy_loss.backward()
        self.optimizer.step()
        return total, policy_loss.item()

    def params(self):
        return [p.detach().clone() for p in self.policy.parameters()]


class Agent(Learner):
    def __init__(self, world_size):
        self.ob_rrefs = []
        self.agent_rref = rpc.RRef(self)
        ob_ids = []
        for ob_rank in range(1, world_size):
            ob_info = rpc.get_worker_info(OBSERVER_NAME.format(ob_rank))
            self.ob_rrefs.append(rpc.remote(ob_info, Observer))
            ob_ids.append(ob_info.id)
        super().__init__(ob_ids)

    def run_episode(self, n_steps=0):
        futs = []
        for ob_rref in self.ob_rrefs:
            # make async RPC to kick off an episode on all observers
            futs.append(
                rpc.rpc_async(
                    ob_rref.owner(),
                    _call_method,
                    args=(Observer.run_episode, ob_rref, self.agent_rref, n_steps),
                )
            )
        # wait until all observers have finished this episode
        for fut in futs:
            fut.wait()


def run_agent(world_size):
    agent = Agent(world_size)
    totals, losses = [], []
    for _ in range(EPISODES):
        agent.run_episode(n_steps=N_STEPS)
        total, loss = agent.finish_episode()
        totals.append(total)
        losses.append(loss)
    return {"rewards": torch.tensor(totals), "losses": torch.tensor(losses),
            "params": agent.params()}


def run(rank: int, world_size: int, port: int):
    options = rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=8, rpc_timeout=60, init_method=f"tcp://127.0.0.1:{port}")
    if rank == 0:
        rpc.init_rpc(AGENT_NAME, rank=rank, world_size=world_size, rpc_backend_options=options)
        result = run_agent(world_size)
    else:
        rpc.init_rpc(OBSERVER_NAME.format(rank), rank=rank, world_size=world_size,
                     rpc_backend_options=options)
        result = None
    # block until all rpcs finish, and shutdown the RPC instance
    rpc.shutdown()
    return result


def reference(world_size: int = 3):
    """The same episodes played locally (observer ids are their ranks)."""
    ob_ids = list(range(1, world_size))
    learner = Learner(ob_ids)
    envs = {i: FakeEnv(seed=i) for i in ob_ids}
    totals, losses = [], []
    for _ in range(EPISODES):
        for i in ob_ids:
            state = envs[i].reset()
            for _ in range(N_STEPS):
                action = learner.select_action(i, state)
                state, reward, _ = envs[i].step(action)
                learner.report_reward(i, reward)
        total, loss = learner.finish_episode()
        totals.append(total)
        losses.append(loss)
    return {"rewards": torch.tensor(totals), "losses": torch.tensor(losses),
            "params": learner.params()}
