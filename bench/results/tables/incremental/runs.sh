#!/bin/bash
# interleaved: base (11d2d65) and this branch, same bench file
out=/tmp/t2/results; mkdir -p $out
for round in 1 2; do
 for args in "--services 60 --size 16381 --changes 30" "--services 1000 --size 1021 --changes 30"; do
  for tree in base new; do
   dir=/tmp/t2/base; [ $tree = new ] && dir=/work/wt-tables2
   tag=$(echo $args | tr -d ' -')
   (cd $dir && nice -n 5 .venv/bin/python -m bench.tables $args > $out/$tree-$tag-$round.json 2>$out/$tree-$tag-$round.err)
   echo "$tree $args $round done $(date -u +%T)"
  done
 done
done
