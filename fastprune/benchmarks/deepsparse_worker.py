"""A DeepSparse engine behind a pipe, for `fastprune bench sparse`'s DeepSparse baseline.

DeepSparse 1.8 pins numpy < 2 and onnx < 1.15, which fastprune's own environment may not have, so
the engine runs in whichever Python has it (this file needs numpy and deepsparse only, no torch and
no fastprune). Commands arrive as JSON lines on stdin, answers leave as JSON lines on the original
stdout (the engine's own prints go to stderr):

  {"cmd": "compile", "onnx": PATH, "batch": B, "cores": K}  -> {"version": "1.8.0"}
  {"cmd": "input", "path": NPY}                           -> {"shape": [...]}   (the input to run on)
  {"cmd": "run", "out": NPY or null, "burst": K}          -> {"seconds": S}     (K - 1 runs after an
                                                                   untimed one, back to back, their median
                                                                   seconds; K = 1: one run; the output
                                                                   saved if asked)
  {"cmd": "quit"}
Failures answer {"error": "..."}. Arrays travel as .npy files read with allow_pickle=False.
"""
import json
import os
import sys
import time


def main() -> int:
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # the engine's banners and logs must not reach the protocol stream
    import numpy as np

    engine, inputs = None, None
    for line in sys.stdin:
        try:
            msg = json.loads(line)
            cmd = msg.get("cmd")
            if cmd == "quit":
                break
            if cmd == "compile":
                import deepsparse

                engine = deepsparse.compile_model(msg["onnx"], batch_size=int(msg["batch"]),
                                                  num_cores=int(msg["cores"]))
                answer = {"version": deepsparse.__version__}
            elif cmd == "input":
                inputs = [np.ascontiguousarray(np.load(msg["path"], allow_pickle=False), dtype=np.float32)]
                answer = {"shape": list(inputs[0].shape)}
            elif cmd == "run":
                if engine is None or inputs is None:
                    raise RuntimeError("compile a model and give an input first")
                burst = int(msg.get("burst", 1))
                if burst > 1:
                    engine(inputs)  # untimed: the engine's threads may have slept while the caller ran
                seconds = []
                for _ in range(max(1, burst - 1)):
                    start = time.perf_counter()
                    outputs = engine(inputs)
                    seconds.append(time.perf_counter() - start)
                answer = {"seconds": sorted(seconds)[len(seconds) // 2]}
                if msg.get("out"):
                    np.save(msg["out"], np.asarray(outputs[0]), allow_pickle=False)
            else:
                raise ValueError(f"unknown command {cmd!r}")
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller as an answer
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        answers.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
