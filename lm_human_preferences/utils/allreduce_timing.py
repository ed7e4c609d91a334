"""Time the gradient all-reduce of training on a flat float32 buffer: what `bench.py` runs under `mpiexec`.

    mpiexec -n 2 python -m lm_human_preferences.utils.allreduce_timing ELEMENTS WARMUP REPEATS

Each rank builds the same graph the optimizer builds (`train_ops.average_across_ranks` on one buffer of ELEMENTS
float32 values, through whichever all-reduce LMHP_ALLREDUCE picks), checks the result once against the mean of the
ranks' buffers, then times REPEATS runs after WARMUP untimed ones. Rank 0 prints one line:
`ALLREDUCE_RESULT {json}` with the all-reduce used and the seconds of each timed run.
"""

import json
import sys
import time

RESULT_PREFIX = "ALLREDUCE_RESULT "


def main(argv):
    if len(argv) != 3 or not all(arg.isdigit() and int(arg) >= 0 for arg in argv) or int(argv[0]) < 1:
        sys.exit(f"usage: python -m {__spec__.name if __spec__ else 'allreduce_timing'} ELEMENTS WARMUP REPEATS "
                 f"(non-negative integers, ELEMENTS >= 1); got {argv}")
    elements, warmup, repeats = map(int, argv)
    from lm_human_preferences.utils import devices, mpi
    tf = devices.import_tensorflow().compat.v1
    tf.disable_eager_execution()
    mpi.install_abort_on_error()
    from lm_human_preferences.utils import train_ops

    # Rank r's buffer holds r + 1 everywhere but its first entries, which hold a ramp; the mean is known exactly.
    base = tf.fill([elements], float(mpi.rank() + 1))
    ramp = tf.range(min(elements, 8), dtype=tf.float32) * float(mpi.rank() + 1)
    buffer = tf.Variable(tf.concat([ramp, base[min(elements, 8):]], axis=0), name="gradient_buffer")
    averaged = train_ops.average_across_ranks([buffer])[0]
    # The all-reduce runs in full for any read of its output; reading a few entries keeps the fetch itself cheap.
    probe = tf.concat([averaged[:min(elements, 8)], averaged[-1:]], axis=0)
    session = tf.Session()
    session.run(tf.global_variables_initializer())

    mean_factor = (mpi.size() + 1) / 2  # mean of 1..size
    expected = [index * mean_factor for index in range(min(elements, 8))] + [mean_factor]
    got = session.run(probe)
    if any(abs(g - e) > 1e-4 * max(1.0, abs(e)) for g, e in zip(got, expected)):
        raise RuntimeError(f"all-reduce gave {list(got)}, expected {expected}")
    for _ in range(warmup):
        session.run(probe)
    seconds = []
    for _ in range(repeats):
        mpi.barrier()  # every rank starts together, so the time is the collective's, not a rank's lateness
        start = time.perf_counter()
        session.run(probe)
        seconds.append(time.perf_counter() - start)
    if mpi.is_root():
        print(RESULT_PREFIX + json.dumps({"allreduce": mpi.allreduce_name(), "ranks": mpi.size(),
                                          "elements": elements, "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
