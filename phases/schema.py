"""Column names, Arrow types and units of every table a sweep writes.

These names are part of the interface: `docs/schema.md` documents each of them and a test checks
that it does. A missing measurement is null, never 0 or NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    unit: str
    description: str


IDENTITY = (
    Column("point_id", pa.string(), "-", "stable hash of the point's settings and coordinates"),
    Column("kind", pa.string(), "-", "trial kind: isotropic, scale_invariant or remask"),
    Column("protocol", pa.string(), "-", "sphere, elr or lr; adamw for remask"),
    Column("lr", pa.float64(), "1/step", "effective LR elr for sphere and elr; the plain SGD step for lr; the head's AdamW lr for remask"),
    Column("wd", pa.float64(), "1/step", "weight decay lambda (coupled L2); 0 for sphere; AdamW's decoupled weight decay for remask"),
    Column("noise", pa.float64(), "loss units", "gradient-noise scale sigma at unit radius; for remask the G-Star temperature tau (no unit)"),
    Column("radius", pa.float64(), "-", "fixed norm ||w|| under sphere; null otherwise"),
    Column("batch_size", pa.int64(), "samples", "minibatch size; null where the kind has none"),
    Column("seed", pa.int64(), "-", "seed coordinate of the point"),
    Column("width", pa.int64(), "channels", "network width (ConvNet c, ResNet k, MLP hidden units); null where the kind has none"),
)

TRAJECTORY = (
    Column("step", pa.int64(), "steps", "SGD steps taken before the measurement"),
    Column("loss", pa.float64(), "loss units", "training loss, mean over replicas"),
    Column("loss_std", pa.float64(), "loss units", "standard deviation of the loss over replicas"),
    Column("radius_norm", pa.float64(), "-", "||w||, mean over replicas"),
    Column("elr", pa.float64(), "1/step", "effective learning rate lr_t / ||w||^2, mean over replicas"),
    Column("angular_update", pa.float64(), "rad", "angle the direction turned in the last step, mean over replicas"),
    Column("grad_norm", pa.float64(), "loss units", "||grad L(w_bar)|| at unit radius, mean over replicas"),
    Column("noise_trace", pa.float64(), "loss units^2", "tr Sigma of the gradient noise at unit radius (injected plus minibatch), mean over replicas"),
    Column("sigma2", pa.float64(), "loss units^2", "per-direction noise variance tr Sigma / (d - 1)"),
    Column("snr", pa.float64(), "-", "signal-to-noise ratio ||grad L(w_bar)|| / sqrt(tr Sigma), mean over replicas"),
    Column("S_direction", pa.float64(), "nats", "entropy of the replicas' directions at this step; null unless entropy.trajectory"),
    Column("test_loss", pa.float64(), "loss units", "held-out loss; null where the kind has no test set"),
    Column("test_acc", pa.float64(), "fraction", "held-out accuracy; null where the kind has no test set"),
    Column("train_acc", pa.float64(), "fraction", "full-batch training accuracy; null where the kind has no labels"),
    Column("temperature", pa.float64(), "loss units", "T from this step's sigma2: elr sigma2 / 2 (sphere, elr), sqrt(lr wd sigma2 / (2 (d - 1))) (lr)"),
    Column("lambda_eff", pa.float64(), "1/step", "sphere: effective weight decay of the last step, (||w after step|| - r) / (elr r^3)"),
)

SUMMARY = (
    Column("dim", pa.int64(), "-", "d, the number of scale-invariant parameters"),
    Column("replicas", pa.int64(), "-", "independent chains averaged for this point"),
    Column("window_start", pa.int64(), "steps", "first step of the stationary window"),
    Column("window_end", pa.int64(), "steps", "last step of the stationary window"),
    Column("stationary", pa.bool_(), "-", "window halves agree (no change > 1% with |z| > 4) and the log-time trend test passes"),
    Column("diverged", pa.bool_(), "-", "true when any replica's norm became non-finite or exceeded max_radius"),
    Column("diverged_step", pa.int64(), "steps", "step at which divergence was detected; null otherwise"),
    Column("U", pa.float64(), "loss units", "internal energy: mean training loss over the window"),
    Column("U_std", pa.float64(), "loss units", "standard deviation of the loss over the window and replicas"),
    Column("U_sem", pa.float64(), "loss units", "standard error of U from the spread of replica means"),
    Column("loss_min", pa.float64(), "loss units", "minimum of the loss on the sphere, where known"),
    Column("U_uniform", pa.float64(), "loss units", "mean loss of uniformly random directions (sampled)"),
    Column("S_uniform_direction", pa.float64(), "nats", "entropy estimate of uniformly random directions, same estimator and sample size"),
    Column("r", pa.float64(), "-", "mean ||w|| over the window"),
    Column("r2", pa.float64(), "-", "mean ||w||^2 over the window"),
    Column("r_std", pa.float64(), "-", "standard deviation of ||w|| over the window"),
    Column("elr_mean", pa.float64(), "1/step", "mean effective learning rate over the window"),
    Column("angular_update2", pa.float64(), "rad^2", "mean squared change of the unit direction per step"),
    Column("grad_norm2", pa.float64(), "loss units^2", "mean ||grad L(w_bar)||^2 at unit radius"),
    Column("snr", pa.float64(), "-", "signal-to-noise ratio sqrt(grad_norm2 / noise_trace) over the window"),
    Column("noise_trace", pa.float64(), "loss units^2", "tr Sigma at unit radius"),
    Column("sigma2", pa.float64(), "loss units^2", "tr Sigma / (d - 1)"),
    Column("lambda_eff", pa.float64(), "1/step", "sphere: effective weight decay (||w after step|| - r) / (elr r^3)"),
    Column("S_direction", pa.float64(), "nats", "entropy of the direction distribution on the unit sphere (k-NN estimate)"),
    Column("entropy_samples", pa.int64(), "-", "directions used for the entropy estimate"),
    Column("drift_r2", pa.float64(), "-", "relative change of mean ||w||^2 between the window halves"),
    Column("drift_U", pa.float64(), "-", "relative change of U between the window halves"),
    Column("drift_z_r2", pa.float64(), "-", "z-score of the ||w||^2 change between window halves (paired replicas)"),
    Column("drift_z_U", pa.float64(), "-", "z-score of the U change between window halves (paired replicas)"),
    Column("train_acc", pa.float64(), "fraction", "mean full-batch training accuracy over the window; null where the kind has no labels"),
    Column("test_loss", pa.float64(), "loss units", "mean held-out loss over the window; null where the kind has no test set"),
    Column("test_acc", pa.float64(), "fraction", "mean held-out accuracy over the window; null where the kind has no test set"),
)

# Sample quality, one row per sampling step count: the columns of samples.parquet after IDENTITY,
# and the quality columns of points.parquet at the spec's diagram step count.
QUALITY = (
    Column("sample_steps", pa.int64(), "steps", "sampling steps of the G-Star sampler"),
    Column("samples", pa.int64(), "sequences", "samples drawn for the metrics"),
    Column("validity", pa.float64(), "fraction", "samples that `ast.parse` accepts as one complete statement (code corpus)"),
    Column("reference_perplexity", pa.float64(), "-", "exp of the reference model's mean NLL per character of the samples; null without a reference model"),
    Column("distinct_1", pa.float64(), "fraction", "distinct words over all words of the samples"),
    Column("distinct_2", pa.float64(), "fraction", "distinct word bigrams over all bigrams"),
    Column("distinct_3", pa.float64(), "fraction", "distinct word trigrams over all trigrams"),
    Column("unigram_entropy", pa.float64(), "nats", "entropy of the samples' word frequencies"),
    Column("mean_length", pa.float64(), "characters", "mean sample length up to the first padding token"),
    Column("denoiser_passes", pa.int64(), "passes", "denoiser forward passes per sample"),
    Column("head_passes", pa.int64(), "passes", "passes of the remasking head per sample (guided steps); each costs a backbone pass, or head_blocks / layers of one"),
    Column("forward_passes", pa.int64(), "passes", "denoiser_passes + head_passes"),
)

# The remasking head's own measurements (remask kind), on proposals from held-out sequences.
HEAD = (
    Column("head_bce", pa.float64(), "nats", "binary cross-entropy of the head's error logits"),
    Column("head_auroc", pa.float64(), "-", "area under the ROC curve of the error logits; 0.5 is chance"),
    Column("head_f1", pa.float64(), "fraction", "F1 of the errors flagged at logit > 0"),
    Column("head_base_rate", pa.float64(), "fraction", "fraction of proposal tokens that are wrong"),
    Column("head_f1_all", pa.float64(), "fraction", "F1 of flagging every token, 2 p / (1 + p) at base rate p"),
    Column("head_train_loss", pa.float64(), "nats", "mean training BCE over the last tenth of the fine-tuning steps"),
)

THERMO = (
    Column("T", pa.float64(), "loss units", "temperature: elr sigma^2 / 2 (sphere, elr); sqrt(lr wd sigma^2 / (2 (d - 1))) (lr)"),
    Column("p", pa.float64(), "1/step", "pressure: wd (elr, lr); measured lambda_eff (sphere)"),
    Column("V", pa.float64(), "-", "volume r2 / 2"),
    Column("S", pa.float64(), "nats", "entropy S_direction + (d - 1) log r"),
    Column("U_theory", pa.float64(), "loss units", "equipartition prediction loss_min + (d - 1) T / 2"),
    Column("S_direction_theory", pa.float64(), "nats", "small-T prediction (d - 1)/2 log(2 pi e T)"),
    Column("r2_theory", pa.float64(), "-", "continuous equation of state (d - 1) T / p; for sphere the imposed radius^2"),
    Column("eos_ratio", pa.float64(), "-", "p r2 / ((d - 1) T); 1 on the equation of state"),
    Column("eos_ratio_discrete", pa.float64(), "-", "p r2 over the discrete-step prediction with ||grad L||^2 added to tr Sigma"),
    Column("stationary_from", pa.int64(), "steps", "first logged step of the longest trend-free window of loss and ||w||; null if none"),
    Column("trend_change", pa.float64(), "-", "relative change of loss or ||w|| fitted across that window"),
    Column("trend_stationary", pa.bool_(), "-", "whether the trajectory passed the log-time trend test"),
    Column("loss_slope", pa.float64(), "-", "d ln(loss) / d ln(step) over the last logged steps, from an eighth of the run on"),
    Column("grad_norm_slope", pa.float64(), "-", "d ln(grad_norm) / d ln(step) over the same steps"),
    Column("converging", pa.bool_(), "-", "loss falls significantly (slope < -0.05, p < 0.01) and the gradient norm falls"),
    Column("T_free_energy", pa.float64(), "loss units", "sphere: T for which this state minimises F = U - T S among the slice's states"),
    Column("T_free_energy_min", pa.float64(), "loss units", "lower end of that T interval"),
    Column("T_free_energy_max", pa.float64(), "loss units", "upper end of that T interval"),
    Column("T_trajectory", pa.float64(), "loss units", "dU/dS along the trajectory at its end (median of the last 3 estimates); needs entropy.trajectory"),
    Column("regime", pa.string(), "-", "converged, equilibrium, divergent or unknown"),
    Column("boundary_below", pa.float64(), "1/step", "nearest regime boundary (lr) below this point on its line; null if none"),
    Column("boundary_above", pa.float64(), "1/step", "nearest regime boundary (lr) above this point on its line; null if none"),
    Column("S_quadratic_residual", pa.float64(), "nats", "S minus the protocol's quadratic fit in (ln lr, ln wd or ln radius)"),
)

TRAJECTORY_SCHEMA = pa.schema([pa.field(c.name, c.type) for c in IDENTITY + TRAJECTORY])
SAMPLES_SCHEMA = pa.schema([pa.field(c.name, c.type) for c in IDENTITY + QUALITY])
POINTS_SCHEMA = pa.schema([pa.field(c.name, c.type) for c in IDENTITY + SUMMARY + HEAD + QUALITY + THERMO])
PART_SCHEMA = pa.schema(
    [pa.field(c.name, c.type) for c in IDENTITY + SUMMARY + HEAD + QUALITY]
    + [pa.field("trajectory", pa.list_(pa.struct([pa.field(c.name, c.type) for c in TRAJECTORY])))]
    + [pa.field("sample_quality", pa.list_(pa.struct([pa.field(c.name, c.type) for c in QUALITY])))]
)
