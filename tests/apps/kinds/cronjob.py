"""A cron job: appends a line to DATA_ROOT/cron.log each time it runs."""
import os
import time

with open(os.path.join(os.environ["DATA_ROOT"], "cron.log"), "a") as f:
    f.write(f"{os.environ['PROC_TYPE']} {time.time()}\n")
