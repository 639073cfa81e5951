"""The adversarial training step: a GAN's two optimizers in one jit-compiled function."""
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llmx.families.gan import model as gan_lib
from llmx.train import losses
from llmx.train.step import Trainable, track_nonfinite


def adversarial(gan: gan_lib.GAN, g_tx: optax.GradientTransformation,
                d_tx: optax.GradientTransformation, *, loss: str, n_critic: int, batch_size: int,
                gp_weight: float = 0.0, seed: int = 0) -> Trainable:
  """The Trainable of a GAN: each step makes `n_critic` discriminator updates with `d_tx`, then one
  generator update with `g_tx` against the updated discriminator, in one jit-compiled function.

  State: {g_params, g_rest (batch statistics), g_opt_state, d_params, d_opt_state, step,
  nonfinite_step}. A batch is the real data of the step, [n_critic * batch_size, *data_shape].
  The noise of step s comes from fold_in(key(seed), s), so a resumed run draws the same noise.
  """
  losses.check_gan_loss(loss)
  if loss == "wgan_gp" and gp_weight <= 0:
    raise ValueError("the wgan_gp loss needs gp_weight > 0: without the penalty the critic is unbounded")
  use_gp = gp_weight > 0  # any loss may take the penalty (Fedus et al. 2018); WGAN-GP must
  g_graphdef, g_params, g_rest = nnx.split(gan.generator, nnx.Param, ...)
  d_graphdef, d_params, d_rest = nnx.split(gan.discriminator, nnx.Param, ...)
  if jax.tree.leaves(d_rest):
    raise ValueError("the discriminator must hold parameters only (no batch statistics or RNG "
                     "streams): the gradient penalty needs per-sample outputs")
  gan.eval()
  g_eval_graphdef, d_eval_graphdef = nnx.split(gan.generator)[0], nnx.split(gan.discriminator)[0]
  gan.train()
  noise_dim = gan.generator.noise_dim
  base_key, eval_key = jax.random.split(jax.random.key(seed))

  def init():
    return dict(g_params=g_params, g_rest=g_rest, g_opt_state=g_tx.init(g_params),
                d_params=d_params, d_opt_state=d_tx.init(d_params),
                step=jnp.zeros((), jnp.int32), nonfinite_step=jnp.full((), -1, jnp.int32))

  def generate(params, rest, key):
    # copy=True: fresh Variables at this trace level, so batch norm may update its statistics.
    g = nnx.merge(g_graphdef, params, rest, copy=True)
    x = g(jax.random.normal(key, (batch_size, noise_dim), jnp.float32))
    return x, nnx.state(g, nnx.Not(nnx.Param))

  def critic(params, graphdef=d_graphdef):
    return nnx.merge(graphdef, params, d_rest, copy=True)

  def d_loss_of(params, real, fake, alpha):
    d = critic(params)
    real_logits, fake_logits = d(real), d(fake)
    d_loss = losses.discriminator_loss(loss, real_logits, fake_logits)
    gp = losses.gradient_penalty(d, real, fake, alpha) if use_gp else jnp.zeros(())
    return d_loss + gp_weight * gp, dict(d_loss=d_loss, gradient_penalty=gp,
                                         d_real=jnp.mean(real_logits), d_fake=jnp.mean(fake_logits))

  def train_step(state, batch):
    real = batch.reshape((n_critic, batch_size) + batch.shape[1:])
    keys = jax.random.split(jax.random.fold_in(base_key, state["step"]), n_critic + 1)

    def critic_step(carry, inputs):
      params, opt_state, g_rest = carry
      real_i, key = inputs
      z_key, alpha_key = jax.random.split(key)
      fake, g_rest = generate(state["g_params"], g_rest, z_key)
      alpha = jax.random.uniform(alpha_key, (batch_size,))
      (total, aux), grads = jax.value_and_grad(d_loss_of, has_aux=True)(
          params, real_i, jax.lax.stop_gradient(fake), alpha)
      updates, opt_state = d_tx.update(grads, opt_state, params)
      aux = dict(aux, d_total=total, d_grad_norm=optax.tree.norm(grads))
      return (optax.apply_updates(params, updates), opt_state, g_rest), aux

    (new_d_params, d_opt_state, g_rest), d_aux = jax.lax.scan(
        critic_step, (state["d_params"], state["d_opt_state"], state["g_rest"]), (real, keys[:-1]))

    def g_loss_of(params):
      fake, rest = generate(params, g_rest, keys[-1])
      return losses.generator_loss(loss, critic(new_d_params)(fake)), rest

    (g_loss, g_rest), g_grads = jax.value_and_grad(g_loss_of, has_aux=True)(state["g_params"])
    updates, g_opt_state = g_tx.update(g_grads, state["g_opt_state"], state["g_params"])
    d_total = jnp.mean(d_aux.pop("d_total"))
    metrics = {k: jnp.mean(v) for k, v in d_aux.items() if use_gp or k != "gradient_penalty"}
    metrics.update(g_loss=g_loss, g_grad_norm=optax.tree.norm(g_grads))
    new_g_params = optax.apply_updates(state["g_params"], updates)
    new_state = dict(g_params=new_g_params, g_rest=g_rest,
                     g_opt_state=g_opt_state, d_params=new_d_params, d_opt_state=d_opt_state,
                     step=state["step"] + 1,
                     nonfinite_step=track_nonfinite(state, d_total + g_loss))
    return new_state, metrics

  def eval_step(state, batch):
    """Both losses on a fixed real batch and fixed noise, with the models in eval mode."""
    model = model_of(state)
    real = batch[:batch_size]
    real_logits = model.discriminator(real)
    fake_logits = model.discriminator(model.sample(eval_key, len(real)))
    return dict(d_loss=losses.discriminator_loss(loss, real_logits, fake_logits),
                g_loss=losses.generator_loss(loss, fake_logits))

  def model_of(state):
    return gan_lib.GAN(nnx.merge(g_eval_graphdef, state["g_params"], state["g_rest"]),
                       nnx.merge(d_eval_graphdef, state["d_params"], d_rest))

  return Trainable(init=init, train_step=train_step, eval_step=eval_step, model_of=model_of)
