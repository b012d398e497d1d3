"""Features of a data set: ``extract`` writes safetensors shards that ``probe --features`` reads, a folder is never
overwritten, a setting that differs is named field by field with its flag, the subset is taken from the folder;
and the fast probe with its floors on the result."""
import json
import shutil


from ldae_models.cli import main

TINY_ARGS = json.dumps(dict(img_size=16, embed_dim=32, depth=2, num_heads=2, latent_dim=6))
COMMON = ['--model', 'ldae_vit_tiny_patch4_32', '--model-args', TINY_ARGS]


def test_probe_fast_and_grid_on_a_separable_set(folder, tmp_path):
    out = tmp_path / 'probe.json'
    assert main(['probe', '--model', 'ldae_vit_tiny_patch4_32', '--model-args', TINY_ARGS, '--data-root', str(folder),
                 '--floors', '--out', str(out)]) == 0
    r = json.loads(out.read_text())
    assert r['top1'] >= 90 and r['n_train'] == 40 and r['n_test'] == 16 and r['grid'][0]['knn_top1'] >= 90
    assert r['floors']['raw_pixels']['dim'] == 768 and r['floors']['random_same_shape']['top1'] >= 90
    assert main(['probe', '--model', 'ldae_vit_tiny_patch4_32', '--model-args', TINY_ARGS, '--data-root', str(folder),
                 '--mode', 'grid', '--ts', '0', '40', '--out', str(out), '--features', str(tmp_path / 'feats')]) == 0
    r = json.loads(out.read_text())
    assert len(r['grid']) == 4 and all(0 <= g['top1'] <= 100 for g in r['grid'])
    assert (tmp_path / 'feats/train/index.json').is_file()
    # the second run reads the cached features
    assert main(['probe', '--model', 'ldae_vit_tiny_patch4_32', '--model-args', TINY_ARGS, '--data-root', str(folder),
                 '--mode', 'grid', '--ts', '0', '40', '--out', str(out), '--features', str(tmp_path / 'feats')]) == 0
    assert json.loads(out.read_text())['extract_s'] == 0.0


def test_extract_writes_shards_that_the_probe_reads(folder, tmp_path):
    from ldae_models.features import load_feature_shards
    out = tmp_path / 'feats'
    assert main(['extract', '--model', 'ldae_vit_tiny_patch4_32', '--model-args', TINY_ARGS, '--data-root', str(folder),
                 '--layers', '0', '1', '--ts', '0', '10', '--shard-size', '16', '--out', str(out)]) == 0
    feats, labels, index = load_feature_shards(out / 'train')
    assert set(feats) == {(0, 0.0), (0, 10.0), (1, 0.0), (1, 10.0)} and len(labels) == 40
    assert len(index['shards']) == 3 and all(v.shape == (40, 32) for v in feats.values())  # 16 + 16 + 8 rows
    r = tmp_path / 'r.json'
    assert main(['probe', '--model', 'ldae_vit_tiny_patch4_32', '--model-args', TINY_ARGS, '--data-root', str(folder),
                 '--layers', '1', '--ts', '10', '--features', str(out), '--out', str(r)]) == 0
    assert json.loads(r.read_text())['extract_s'] == 0.0  # read, not extracted
    assert main(['probe', '--model', 'ldae_vit_tiny_patch4_32', '--model-args', TINY_ARGS, '--data-root', str(folder),
                 '--layers', '1', '--ts', '10', '--features', str(out), '--noisy-input']) == 2  # another setting


def test_extract_without_the_split_writes_nothing(folder, tmp_path, capsys):
    only_train = tmp_path / 'only_train'
    import shutil
    shutil.copytree(folder / 'train', only_train / 'train')
    assert main(['extract', '--model', 'ldae_vit_tiny_patch4_32', '--model-args', TINY_ARGS, '--data-root',
                 str(only_train), '--out', str(tmp_path / 'f')]) == 2
    err = capsys.readouterr().err
    assert 'has no ROOT/test/ or ROOT/val/ folder' in err and 'extract only the splits there are with --splits' in err
    assert not (tmp_path / 'f').exists()


def test_a_feature_folder_is_never_destroyed_by_a_read(folder, tmp_path, capsys):
    """extract then probe --features (the README's pair): layer -1 is the last block, the cells the folder holds are
    read, a missing cell is extracted alone and added beside the others; no file is rewritten."""
    from ldae_models.features import load_feature_shards
    out, r = tmp_path / 'feats', tmp_path / 'r.json'
    common = ['--model', 'ldae_vit_tiny_patch4_32', '--model-args', TINY_ARGS, '--data-root', str(folder)]
    assert main(['extract', *common, '--layers', '0', '1', '--ts', '0', '10', '--out', str(out)]) == 0
    before = {f: f.read_bytes() for f in out.rglob('*.safetensors')}
    assert main(['probe', *common, '--ts', '10', '--features', str(out), '--out', str(r), '--no-knn']) == 0
    res = json.loads(r.read_text())
    assert res['extract_s'] == 0.0 and res['best_layer'] == 1  # -1 read as block 1, the last
    assert 'block 1 t 10: linear' in capsys.readouterr().out
    assert main(['probe', *common, '--layers', '-1', '--ts', '10', '40', '--features', str(out), '--out', str(r),
                 '--no-knn']) == 0
    err = capsys.readouterr().err
    assert 'lacks 1 of the 2 cells (block 1 t 40): extracting only those' in err
    assert json.loads(r.read_text())['extract_s'] > 0
    assert all(f.read_bytes() == b for f, b in before.items())  # the old shards untouched
    feats, labels, index = load_feature_shards(out / 'train')
    assert set(feats) == {(0, 0.0), (0, 10.0), (1, 0.0), (1, 10.0), (1, 40.0)} and len(labels) == 40
    # extract into the folder again: nothing to do, nothing written
    assert main(['extract', *common, '--layers', '1', '--ts', '40', '--out', str(out)]) == 0
    assert len(list(out.rglob('*.safetensors'))) == 4


def test_probe_takes_the_subset_of_its_feature_folder_and_names_what_differs(folder, tmp_path, capsys):
    """extract --max-train 20, then probe --features without the flag: the folder's subset is taken (and said); a
    setting that differs is named with its flag and both values."""
    feats = tmp_path / 'feats'
    data = ['--data-root', str(folder)]
    assert main(['extract', *COMMON, *data, '--max-train', '20', '--max-test', '8', '--out', str(feats)]) == 0
    capsys.readouterr()
    assert main(['probe', *COMMON, *data, '--features', str(feats), '--no-knn', '--out', str(tmp_path / 'r.json')]) == 0
    r = json.loads((tmp_path / 'r.json').read_text())
    assert r['extract_s'] == 0.0 and r['n_train'] == 20 and r['n_test'] == 8
    assert '--max-train 20, --max-test 8: taken from it' in capsys.readouterr().err
    assert main(['probe', *COMMON, *data, '--features', str(feats), '--max-train', '30', '--no-knn']) == 2
    err = capsys.readouterr().err
    assert '--max-train 20 there, 30 now' in err and 'give the same flags, or another folder' in err
    assert main(['probe', *COMMON, *data, '--features', str(feats), '--noisy-input', '--no-knn']) == 2
    assert '--noisy-input off there, on now' in capsys.readouterr().err


def test_data_roots_and_outputs_are_checked_in_words_before_any_work(folder, tmp_path, capsys):
    assert main(['extract', *COMMON, '--data-root', str(tmp_path / 'nope'), '--out', str(tmp_path / 'f')]) == 2
    err = capsys.readouterr().err
    assert 'nope does not exist (--dataset folder reads an ImageFolder: ROOT/train/<class>/*.jpg' in err
    (tmp_path / 'afile.txt').write_text('x')
    assert main(['extract', *COMMON, '--data-root', str(folder), '--out', str(tmp_path / 'afile.txt')]) == 2
    assert 'afile.txt is a file, not a folder: choose a folder' in capsys.readouterr().err
    assert main(['probe', *COMMON, '--data-root', str(folder / 'train' / 'class0' / '0.png')]) == 2
    assert 'is a file; --dataset folder reads an ImageFolder' in capsys.readouterr().err


def test_unreadable_images_are_skipped_on_request_and_listed(folder, tmp_path, capsys):
    root = tmp_path / 'data'
    shutil.copytree(folder, root)
    (root / 'train' / 'class0' / 'corrupt.png').write_bytes(b'not an image at all')
    assert main(['extract', *COMMON, '--data-root', str(root), '--workers', '0', '--out', str(tmp_path / 'f')]) == 2
    err = capsys.readouterr().err
    assert 'corrupt.png: cannot decode the image' in err and '--skip-bad-images' in err
    assert not (tmp_path / 'f').exists()
    assert main(['extract', *COMMON, '--data-root', str(root), '--workers', '0', '--skip-bad-images', '--out',
                 str(tmp_path / 'f')]) == 0
    index = json.loads((tmp_path / 'f/train/index.json').read_text())
    assert index['num_samples'] == 40  # 41 files, 40 readable: their features and labels
    assert 'corrupt.png' in (tmp_path / 'f/train/skipped_images.txt').read_text()
    assert 'skipped: ' in capsys.readouterr().err
