#!/bin/sh
# The demo job: counts from 0 to N-1, one step every COUNTER_DELAY seconds (default 0.2).
# It reads a multiplier k from its input file and writes "i i*k" lines to output.txt.
# Its state is the file counter.state in its working directory, which the `directory`
# checkpoint strategy saves; after a restore it goes on from there.
set -eu
n=${1:-100}
input=${2:-input.txt}
delay=${COUNTER_DELAY:-0.2}
k=$(head -n 1 "$input")
i=0
if [ -f counter.state ]; then
  i=$(cat counter.state)
  echo "resuming at $i"
else
  echo "starting: counting to $n with k=$k"
fi
# keep output.txt consistent with the state: drop lines written after the state was saved
if [ -f output.txt ]; then
  head -n "$i" output.txt > output.txt.tmp
  mv output.txt.tmp output.txt
else
  : > output.txt
fi
while [ "$i" -lt "$n" ]; do
  echo "$i $((i * k))" >> output.txt
  i=$((i + 1))
  echo "$i" > counter.state.tmp
  mv counter.state.tmp counter.state
  if [ $((i % 10)) -eq 0 ]; then
    echo "progress $i/$n"
  fi
  sleep "$delay"
done
echo "done: counted to $n"
