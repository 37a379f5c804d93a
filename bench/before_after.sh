# before (8563ea4, /tmp/old) and after (main), alternating, the real CLI at defaults; run from
# /tmp so that PYTHONPATH, not the working directory, decides which neurimg runs
cd /tmp; . /work/main/.venv/bin/activate
for set in /work/main/examples/logos /tmp/logos48 /tmp/photos256/astronaut.png; do
  for who in before after; do
    if [ $who = before ]; then PP=/tmp/old; else PP=/work/main; fi
    echo "== $who $set $(PYTHONPATH=$PP python -c 'import neurimg, os; print(os.path.dirname(neurimg.__file__))')"
    PYTHONPATH=$PP python /work/main/bench/fit_defaults.py $set 2>&1 | tail -1
  done
done
