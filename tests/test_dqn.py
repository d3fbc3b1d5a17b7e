"""Tests for rl_pg.algos.dqn: targets and loss by hand, target updates, episode
ends in the stored transitions, config validation, a short learning run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_pg import checkpoint, evaluate, train
from rl_pg.algos import dqn
from rl_pg.runs import files

# ------------------------------------------------------------ targets and the loss


def test_q_learning_target_hand_computed():
    r, discount = jnp.asarray(1.0), jnp.asarray(0.9)
    q_target = jnp.array([2.0, 5.0])
    # DQN: the target network selects and evaluates: 1 + 0.9 * 5 = 5.5.
    np.testing.assert_allclose(
        dqn.q_learning_target(r, discount, q_target, q_target), 5.5
    )
    # Double DQN: the online values [3, 1] select action 0, the target network
    # evaluates it: 1 + 0.9 * 2 = 2.8.
    online = jnp.array([3.0, 1.0])
    np.testing.assert_allclose(
        dqn.q_learning_target(r, discount, q_target, online), 2.8
    )
    # A terminal transition (discount 0) is its reward alone.
    np.testing.assert_allclose(dqn.q_learning_target(r, 0.0, q_target, online), 1.0)
    # Ties go to the lowest action: selector [4, 4] picks action 0 -> 1 + 0.9 * 2.
    tie = jnp.array([4.0, 4.0])
    np.testing.assert_allclose(dqn.q_learning_target(r, discount, q_target, tie), 2.8)


def test_targets_match_rlax():
    rlax = pytest.importorskip("rlax")
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    q_tm1 = jax.random.normal(keys[0], (64, 3))
    a_tm1 = jax.random.randint(keys[1], (64,), 0, 3)
    r_t = jax.random.normal(keys[2], (64,))
    discount_t = 0.9 * jax.random.bernoulli(keys[3], 0.8, (64,))
    q_t_value = jax.random.normal(keys[4], (64, 3))
    q_t_selector = jax.random.normal(keys[5], (64, 3))
    ours = jax.vmap(dqn.q_learning_target)(r_t, discount_t, q_t_value, q_t_selector)
    q_taken = q_tm1[jnp.arange(64), a_tm1]
    # rlax returns the TD error target - Q(s, a).
    double = jax.vmap(rlax.double_q_learning)(
        q_tm1, a_tm1, r_t, discount_t, q_t_value, q_t_selector
    )
    np.testing.assert_allclose(ours - q_taken, double, rtol=1e-6, atol=1e-6)
    single = jax.vmap(rlax.q_learning)(q_tm1, a_tm1, r_t, discount_t, q_t_value)
    ours = jax.vmap(dqn.q_learning_target)(r_t, discount_t, q_t_value, q_t_value)
    np.testing.assert_allclose(ours - q_taken, single, rtol=1e-6, atol=1e-6)


def steps(rewards, terminated=None, truncated=None, obs_dim=1):
    """Step [n] of one env: obs_k = [k], next_obs_k = [10 + k], action k % 2."""
    n = len(rewards)
    k = jnp.arange(n, dtype=jnp.float32)[:, None] * jnp.ones(obs_dim)
    return dqn.Step(
        obs=k,
        action=jnp.arange(n, dtype=jnp.int32) % 2,
        reward=jnp.asarray(rewards, jnp.float32),
        next_obs=10.0 + k,
        terminated=jnp.asarray(terminated or [False] * n),
        truncated=jnp.asarray(truncated or [False] * n),
    )


@pytest.mark.parametrize(
    "terminated, truncated, reward, discount, next_obs",
    [
        # No end: 1 + 0.5 * 2 + 0.25 * 4 = 3, bootstrapped with 0.5^3 from s_{t+3}.
        ([False] * 3, [False] * 3, 3.0, 0.125, 12.0),
        # A crash after the 2nd step: 1 + 0.5 * 2 = 2, no bootstrap.
        ([False, True, False], [False] * 3, 2.0, 0.0, 11.0),
        # A time limit after the 1st step: 1, bootstrapped with 0.5 from the final
        # observation; the 3rd step (the next episode) is not summed.
        ([False] * 3, [True, False, False], 1.0, 0.5, 10.0),
        # A time limit after the 2nd step: 2, bootstrapped with 0.25.
        ([False] * 3, [False, True, False], 2.0, 0.25, 11.0),
        # A crash on the last step: the full sum, no bootstrap.
        ([False, False, True], [False] * 3, 3.0, 0.0, 12.0),
    ],
)
def test_n_step_transition_hand_computed(
    terminated, truncated, reward, discount, next_obs
):
    out = dqn.n_step_transition(steps([1.0, 2.0, 4.0], terminated, truncated), 0.5)
    np.testing.assert_allclose(out.reward, reward, rtol=1e-6)
    np.testing.assert_allclose(out.discount, discount, rtol=1e-6)
    np.testing.assert_allclose(out.next_obs, [next_obs])
    np.testing.assert_allclose(out.obs, [0.0])  # always the first step's
    assert int(out.action) == 0


def test_one_step_transition_is_the_step():
    for terminated in (False, True):
        for truncated in (False, True):
            out = dqn.n_step_transition(steps([0.7], [terminated], [truncated]), 0.9)
            np.testing.assert_allclose(out.reward, 0.7, rtol=1e-6)
            np.testing.assert_allclose(out.discount, 0.0 if terminated else 0.9)
            np.testing.assert_allclose(out.next_obs, [10.0])


# A linear Q-network Q(s) = s @ W: the online W is the identity, the target W swaps
# the two actions, so the online and target networks disagree on argmax.
ONLINE = {"w": jnp.eye(2)}
TARGET = {"w": jnp.array([[0.0, 1.0], [1.0, 0.0]])}


def linear_q(params, obs):
    return obs @ params["w"]


def one_step(obs, action, reward, next_obs, terminated, truncated):
    """The one-step transition (gamma = 0.9) that the acting loop would store."""
    step = dqn.Step(
        obs=jnp.asarray([obs]),
        action=jnp.asarray([action]),
        reward=jnp.asarray([reward]),
        next_obs=jnp.asarray([next_obs]),
        terminated=jnp.asarray([terminated]),
        truncated=jnp.asarray([truncated]),
    )
    return dqn.n_step_transition(step, 0.9)


# Three transitions, gamma = 0.9, Huber delta = 1:
#   0: an ordinary step:  Q(s, a=1) = 3, s' = [2, 1], r = 0.5
#   1: a crash:           Q(s, a=0) = 0.5, s' = [10, 10] (ignored), r = -1
#   2: a time-limit cut:  Q(s, a=0) = 2, s' = [3, 4] (the final observation), r = 0.1
BATCH = jax.tree.map(
    lambda *x: jnp.stack(x),
    one_step([1.0, 3.0], 1, 0.5, [2.0, 1.0], False, False),
    one_step([0.5, 0.0], 0, -1.0, [10.0, 10.0], True, False),
    one_step([2.0, 0.0], 0, 0.1, [3.0, 4.0], False, True),
)


def huber(x):
    return 0.5 * x**2 if abs(x) <= 1 else abs(x) - 0.5


@pytest.mark.parametrize(
    "double, targets",
    [
        # DQN: y = r + 0.9 * max_a Q_target(s', a), with Q_target(s') = swap(s').
        #   0: 0.5 + 0.9 * max(1, 2) = 2.3;  1: -1 (terminal);
        #   2: truncated, so bootstrapped: 0.1 + 0.9 * max(4, 3) = 3.7
        (False, [2.3, -1.0, 3.7]),
        # Double DQN: the online net (identity) selects argmax s', the target net
        # evaluates it:
        #   0: argmax [2, 1] = 0 -> 0.5 + 0.9 * 1 = 1.4;  1: -1;
        #   2: argmax [3, 4] = 1 -> 0.1 + 0.9 * 3 = 2.8
        (True, [1.4, -1.0, 2.8]),
    ],
)
def test_dqn_loss_hand_computed(double, targets):
    q_taken = np.array([3.0, 0.5, 2.0])
    td = q_taken - np.array(targets)  # DQN: 0.7, 1.5, -1.7; double: 1.6, 1.5, -0.8
    expected = np.mean([huber(x) for x in td])  # 0.815; double: 0.80667

    def loss_fn(params):
        return dqn.dqn_loss(
            params,
            TARGET,
            BATCH,
            apply_fn=linear_q,
            double_dqn=double,
            huber_delta=1.0,
        )

    (loss, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(ONLINE)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(aux.q_mean, q_taken.mean(), rtol=1e-6)
    np.testing.assert_allclose(aux.target_mean, np.mean(targets), rtol=1e-6)
    np.testing.assert_allclose(aux.td_abs, np.abs(td).mean(), rtol=1e-6)

    # The gradient flows only through Q(s, a), not through the target (nor the
    # online network's selection): dL/dQ = clip(td, -1, 1) / B and
    # dQ(s, a)/dW[:, a] = s.
    g = np.clip(td, -1.0, 1.0) / 3
    expected_grad = np.zeros((2, 2))
    for i in range(3):
        expected_grad[:, int(BATCH.action[i])] += g[i] * np.asarray(BATCH.obs[i])
    np.testing.assert_allclose(grad["w"], expected_grad, rtol=1e-6, atol=1e-7)


def test_epsilon_schedule():
    config = dqn.DQNConfig(epsilon_start=1.0, epsilon_end=0.1, epsilon_decay_steps=100)
    values = [
        float(dqn.epsilon_at(config, jnp.asarray(t))) for t in (0, 50, 100, 10**6)
    ]
    np.testing.assert_allclose(values, [1.0, 0.55, 0.1, 0.1], rtol=1e-6)


def test_dueling_q_hand_computed():
    # A = (1, 3) has mean 2: Q = V + (-1, 1) = (4, 6) for V = 5; batched rows
    # are independent; the argmax is A's.
    q = dqn.dueling_q(jnp.array([[1.0, 3.0], [2.0, -4.0]]), jnp.array([5.0, 0.0]))
    np.testing.assert_allclose(q, [[4.0, 6.0], [3.0, -3.0]])
    np.testing.assert_allclose(jnp.mean(q, axis=-1), [5.0, 0.0])  # mean(Q) = V
    with pytest.raises(AssertionError):
        dqn.dueling_q(jnp.zeros((3, 2)), jnp.zeros(4))


@pytest.mark.slow
def test_dueling_network_q_values_and_greedy_checkpoint_action():
    config = dqn.DQNConfig(dueling=True)
    spec = config.network_spec(2)
    assert spec["value"] == "shared"
    network = dqn.make_network(config)
    obs = jnp.linspace(-1, 1, 5 * 12).reshape(5, 12)
    params = network.init(jax.random.PRNGKey(0), obs[:1])
    # Perturb so the heads are far from their near-zero initialisation.
    params = jax.tree.map(
        lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(1), x.shape), params
    )
    advantages, value = network.apply(params, obs)
    q = dqn._q_apply(network, dueling=True)(params, obs)
    assert q.shape == (5, 2)
    np.testing.assert_allclose(jnp.mean(q, axis=-1), value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        q[:, 1] - q[:, 0], advantages[:, 1] - advantages[:, 0], rtol=1e-5, atol=1e-6
    )
    # The checkpoint's greedy policy (argmax of the logits) acts on Q.
    act = dqn.greedy_act_fn(config)
    np.testing.assert_array_equal(act(params, obs, None, None), jnp.argmax(q, axis=-1))
    assert not bool(jnp.allclose(q, advantages))  # V does enter Q


# --------------------------------------------------------------------- target net


@pytest.mark.slow
def test_target_updates_every_k_steps_by_polyak_averaging():
    # Every 2nd gradient step, target <- 0.25 * online + 0.75 * target (tau = 1
    # would be a hard copy); in between the target stays.
    tau = 0.25
    config = dqn.DQNConfig(tau=tau, target_update_every=2, batch_size=3, lr=0.1)
    params = dqn.make_network(config).init(jax.random.PRNGKey(0), jnp.zeros(12))
    target = jax.tree.map(lambda x: x + 1.0, params)  # a distinct target
    opt_state = dqn.make_optimizer(config).init(params)
    learner = dqn._Learner(params, target, opt_state, jnp.asarray(0, jnp.int32))
    step = jax.jit(dqn._gradient_step, static_argnums=0)
    obs = jnp.linspace(-1, 1, 36).reshape(3, 12)
    batch = dqn.Transition(obs, jnp.array([0, 1, 0]), jnp.ones(3), -obs, jnp.ones(3))

    def assert_tree_close(a, b):
        jax.tree.map(
            lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b
        )

    learner, _ = step(config, learner, batch)
    assert_tree_close(learner.target_params, target)  # step 1: not due
    moved = jax.tree.map(
        lambda a, b: float(jnp.abs(a - b).max()), learner.params, params
    )
    assert max(jax.tree.leaves(moved)) > 0  # the online network did move
    learner, _ = step(config, learner, batch)  # step 2: due
    assert_tree_close(
        learner.target_params,
        jax.tree.map(lambda p, t: tau * p + (1 - tau) * t, learner.params, target),
    )
    assert int(learner.gradient_steps) == 2


# ------------------------------------------------------- transitions at episode ends


@pytest.mark.slow
def test_stored_two_step_transitions_across_time_limits():
    # 2-step transitions, episodes cut after 3 steps, random play, no learning.
    # init takes step 0 (the window); 8 more vector steps of 4 envs store the
    # transitions of steps 0..7. A fresh bird needs ~50 steps to crash, so every
    # end here is a time limit (steps 2, 5, 8): summed up to it and bootstrapped
    # from the cut episode's final observation, never from the next one's start.
    config = dqn.DQNConfig(
        num_envs=4,
        n_step=2,
        max_steps_in_episode=3,
        buffer_size=64,
        epsilon_start=1.0,
        epsilon_end=1.0,
    )

    @jax.jit
    def run(state, key):
        def body(state, key):
            state, step, _ = dqn.collect(config, state, key)
            return state, step

        return jax.lax.scan(body, state, jax.random.split(key, 8))

    state = jax.jit(dqn.init, static_argnums=0)(config, jax.random.PRNGKey(1))
    assert int(state.env_steps) == 4  # step 0, in the window
    state, new_steps = run(state, jax.random.PRNGKey(2))
    assert int(state.env_steps) == 36 and int(state.buffer.size) == 32
    ends = np.asarray(new_steps.terminated | new_steps.truncated)  # steps 1..8
    np.testing.assert_array_equal(ends.any(axis=1), [0, 1, 0, 0, 1, 0, 0, 1])
    assert ends[[1, 4, 7]].all() and not np.asarray(new_steps.terminated).any()
    # Rows t * 4 + env hold step t's transition; the other 32 slots are empty.
    data = jax.tree.map(lambda x: x[:32].reshape(8, 4, *x.shape[1:]), state.buffer.data)
    phase = np.arange(8)[:, None] % 3  # step t's index within its episode

    def per_env(expected):  # the same expectation for each of the 4 envs
        return np.broadcast_to(expected, (8, 4))

    # Feature 0 is the first pipe's x / 288: 288 at a reset, 4 px less per step.
    np.testing.assert_allclose(data.obs[..., 0] * 288, per_env(288 - 4 * phase))
    gamma = 0.99
    last = phase == 2  # the episode's last step: one reward, then the cut
    np.testing.assert_allclose(
        data.reward, per_env(np.where(last, 0.1, 0.1 + gamma * 0.1)), rtol=1e-5
    )
    np.testing.assert_allclose(
        data.discount, per_env(np.where(last, gamma, gamma**2)), rtol=1e-6
    )
    # Bootstrapped from s_{t+2}, or from the final observation (3 steps in) when
    # the episode ends first, never from the next episode's first (288).
    next_phase = np.where(phase == 0, 2, 3)
    np.testing.assert_allclose(
        data.next_obs[..., 0] * 288, per_env(288 - 4 * next_phase), rtol=1e-6
    )


# -------------------------------------------------------------------------- config


def test_defaults_are_valid_and_static():
    config = dqn.DQNConfig()
    assert config.double_dqn and config.tau <= 1.0
    assert config.num_chunks * config.eval_every_steps <= config.total_env_steps
    assert hash(config) == hash(dqn.DQNConfig())
    assert jax.tree.leaves(config) == []  # a static pytree: passes through jit
    assert dqn.DQNConfig(hidden=[32, 32]).hidden == (32, 32)
    pixels = dqn.DQNConfig(env_id="FlappyBird-pixels-v0")
    assert pixels.network_spec(2)["kind"] == "cnn"
    assert dqn.DQNConfig().network_spec(2)["value"] is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_envs=0), "num_envs must be an int >= 1"),
        (dict(batch_size=2.5), "batch_size must be an int >= 1"),
        (dict(learning_starts=-1), "learning_starts must be an int >= 0"),
        (dict(tau=0.0), r"tau must be a number in \(0.0, 1.0\]"),
        (dict(tau=1.5), "tau must be"),
        (dict(gamma=1.01), "gamma must be"),
        (dict(epsilon_end=-0.1), "epsilon_end must be"),
        (dict(lr=float("nan")), "lr must be"),
        (dict(double_dqn=1), "double_dqn must be a bool"),
        (dict(dueling="yes"), "dueling must be a bool"),
        (dict(hidden=(64, 0)), "hidden must be"),
        (dict(activation="sigmoid"), "activation must be one of"),
        (dict(env_id="CartPole-v1"), "env_id must be one of"),
        (dict(stop_at_score=0), "stop_at_score must be None or an int >= 1"),
        (dict(num_envs=32, eval_every_steps=1000), r"num_envs \(32\) must divide"),
        (dict(buffer_size=16, num_envs=32), r"buffer_size \(16\) must hold"),
        (dict(total_env_steps=1000), "must be at least one chunk"),
        (
            dict(total_env_steps=8192, eval_every_steps=4096),
            r"learning_starts \(10000\) must be below the env steps trained \(8192\)",
        ),
        (dict(eval_max_score=10**9), "eval_max_score must be <="),
    ],
)
def test_config_validation_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        dqn.DQNConfig(**overrides)


def test_config_reports_every_problem_at_once():
    with pytest.raises(ValueError) as info:
        dqn.DQNConfig(num_envs=0, gamma=2.0, huber_delta=0.0)
    text = str(info.value)
    assert "num_envs" in text and "gamma" in text and "huber_delta" in text


def test_run_refuses_full_dirs(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("")
    with pytest.raises(FileExistsError):
        train.run(dqn.DQNConfig(), tmp_path / "b")


# ------------------------------------------------------------------------ learning


@pytest.mark.slow
def test_short_run_beats_random_and_writes_the_contract(tmp_path):
    # Random play scores 0 pipes on every level (the bird rises into the first
    # pipe); so does this untrained network. 256k env steps (~3 s of training
    # after ~20 s of compilation) pass pipes on the held-out levels.
    config = dqn.DQNConfig(
        total_env_steps=256_000,
        eval_every_steps=64_000,
        num_envs=16,
        batch_size=128,
        buffer_size=50_000,
        learning_starts=2_000,
        epsilon_decay_steps=30_000,
        lr=1e-3,
        eval_episodes=8,
        final_eval_episodes=8,
        eval_max_score=20,
        stop_at_score=None,
    )
    out = tmp_path / "run"
    result = train.run(config, out, progress=False)  # the one run driver
    for name in (
        "config.json",
        "metrics.csv",
        "eval.json",
        "learning_curve.png",
        "agent.gif",
        "checkpoints/best/params.msgpack",
        "checkpoints/last/meta.json",
    ):
        assert (out / name).is_file(), name
    data = json.loads((out / "eval.json").read_text())
    for field in ("median_score", "mean_score", "scores", "wall_clock_s", "env_steps"):
        assert field in data
    assert len(data["scores"]) == 8 and data == result.eval
    saved = json.loads((out / "config.json").read_text())
    assert saved["algo"] == "dqn" and "jax" in saved["versions"]
    assert dqn.DQNConfig(**_tuples(saved["config"])) == config
    rows = (out / "metrics.csv").read_text().splitlines()
    columns = files.metrics_columns(dqn.ALGORITHM)
    assert rows[0].split(",") == list(columns) and len(rows) == 1 + 4
    assert "td_abs" in columns and "val_median" in columns
    assert [r["env_steps"] for r in result.metrics] == [
        16 * 2 + 64_000 * k
        for k in (1, 2, 3, 4)  # n_step - 1 = 2 window steps
    ]
    assert result.metrics[-1]["gradient_steps"] > 0

    # With the earlier 64x64, Huber-1 defaults seeds 1-3 reached held-out medians
    # of 2, 2 and 5; this seed passes with the current ones.
    assert data["median_score"] >= 1, data["scores"]

    # The best checkpoint is an ordinary policy checkpoint whose greedy policy
    # is the agent: it reproduces the held-out scores.
    act_fn, env, env_params = checkpoint.load_act_fn(out / "checkpoints" / "best")
    again = evaluate.evaluate(
        lambda params, obs, state, key: act_fn(obs, state, key),
        None,
        env,
        env_params,
        jax.random.PRNGKey(0),
        num_episodes=8,
        max_score=20,
    )
    assert [int(s) for s in again.scores] == data["scores"]


def _tuples(config: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
