"""A background worker: proves it runs by writing a file into DATA_ROOT."""
import os
import time

path = os.path.join(os.environ["DATA_ROOT"], f"worker.{os.environ['PROC_INDEX']}")
while True:
    with open(path, "w") as f:
        f.write(f"{os.environ['PROC_TYPE']} {time.time()}\n")
    print("worker tick", flush=True)
    time.sleep(1)
