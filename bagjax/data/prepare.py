"""Make a TFDS dataset readable by the Grain pipeline: ArrayRecord files beside its TFRecord files.

    python -m bagjax.data.prepare tfds:imagenet2012 --data_dir ~/tensorflow_datasets [--manual_dir DIR]

Grain reads examples by index, which TFRecord cannot do. A dataset that is not
prepared yet is downloaded and prepared directly in ArrayRecord. One already
prepared in TFRecord is converted shard by shard as TFDS's `tfds
convert_format --out_file_format=array_record` does: each shard read with
TFDS's TFRecord file adapter and written with its ArrayRecord adapter under
TFDS's own shard names, then `array_record` is added to the dataset's
`alternative_file_formats`. (TFDS's convert_format module itself imports
Apache Beam, whose pins clash with this project's numpy and protobuf.) The
TFRecord files stay; the conversion can be rerun and skips finished shards.
"""

from __future__ import annotations

import os

import tqdm

from bagjax import cli
from bagjax.data import sources


def convert_to_array_record(builder) -> int:
    """Writes the ArrayRecord shards of a builder prepared in another format; returns the shards written."""
    from etils import epath  # pylint: disable=g-import-not-at-top
    from tensorflow_datasets.core import dataset_info  # pylint: disable=g-import-not-at-top
    from tensorflow_datasets.core import file_adapters  # pylint: disable=g-import-not-at-top
    from tensorflow_datasets.core.utils import py_utils  # pylint: disable=g-import-not-at-top

    out_format = file_adapters.FileFormat.ARRAY_RECORD
    data_dir = epath.Path(builder.data_dir)
    info = dataset_info.read_proto_from_builder_dir(data_dir)
    in_format = file_adapters.FileFormat(info.file_format)
    reader = file_adapters.ADAPTER_FOR_FORMAT[in_format]
    writer = file_adapters.ADAPTER_FOR_FORMAT[out_format]
    shards = []
    for split in dataset_info.get_split_dict_from_proto(info, data_dir, in_format).values():
        out_template = split.filename_template.replace(filetype_suffix=out_format.file_suffix)
        for i in range(split.num_shards):
            target = out_template.sharded_filepath(shard_index=i, num_shards=split.num_shards)
            if not target.exists():
                shards.append((split.filename_template.sharded_filepath(shard_index=i, num_shards=split.num_shards),
                               target))
    for source, target in tqdm.tqdm(shards, desc='shards to ArrayRecord', unit='shard', dynamic_ncols=True):
        records = ((i, row.numpy()) for i, row in enumerate(reader.make_tf_data(filename=source)))
        with py_utils.incomplete_file(target) as tmp:
            writer.write_examples(path=tmp, iterator=records)
    if out_format.value not in info.alternative_file_formats:
        info.alternative_file_formats.append(out_format.value)
        dataset_info.write_dataset_info_proto(info, dataset_info_dir=data_dir)
    return len(shards)


FLAGS = sources.Flags('--data_dir', '--manual_dir',
                      'train.py --config.dataset=imagefolder:PATH with PATH/<split>/<label>/*.jpg (no prepare step)')


def prepare(name: str, data_dir: str = '', manual_dir: str = '') -> str:
    """Prepares (or converts) tfds dataset `name` in ArrayRecord; returns what was done, in one line."""
    builder = sources.tfds_builder(name, data_dir)
    if not builder.is_prepared():
        sources.download_and_prepare(builder, name, manual_dir, FLAGS)
        return f'prepared {name} in ArrayRecord in {builder.data_dir}'
    if sources.has_array_record(builder):
        return f'{name} in {builder.data_dir} already has ArrayRecord files: nothing to do'
    written = convert_to_array_record(builder)
    return f'converted {written} shard(s) of {name} to ArrayRecord in {builder.data_dir}'


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog='python -m bagjax.data.prepare', description=__doc__.splitlines()[0])
    parser.add_argument('dataset', help='tfds:NAME[/CONFIG], e.g. tfds:imagenet2012')
    parser.add_argument('--data_dir', default='', metavar='DIR', help='the TFDS data_dir (default: TFDS default)')
    parser.add_argument('--manual_dir', default='', metavar='DIR', help='manual downloads (e.g. the ImageNet tars)')
    args = parser.parse_args(argv)
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # As train.py: no TensorFlow start-up notes on stderr.
    kind, _, name = args.dataset.partition(':')
    if kind != 'tfds' or not name:
        parser.error(f"expected tfds:NAME[/CONFIG], got {args.dataset!r} (imagefolder and synthetic need no step)")
    with cli.user_errors():
        print(prepare(name, args.data_dir, args.manual_dir), flush=True)


if __name__ == '__main__':
    main()
