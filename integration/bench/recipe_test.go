package bench

import (
	"reflect"
	"testing"
)

func TestRecipeHash(t *testing.T) {
	base := Recipes(1 << 30)["python"]
	if got, again := base.Hash(), Recipes(1 << 30)["python"].Hash(); got != again || len(got) != 16 {
		t.Fatalf("hash is not stable: %q, %q", got, again)
	}
	changes := map[string]func(r *Recipe){
		"package":      func(r *Recipe) { r.Stages[1].Packages = append([]string{}, "python3-numpy") },
		"file content": func(r *Recipe) { r.Stages[2].Files = map[string]string{"app/server.py": "print(1)"} },
		"base suite":   func(r *Recipe) { d := *r.Debian; d.Suite = "trixie"; r.Debian = &d },
		"command":      func(r *Recipe) { r.Command = []string{"/bin/true"} },
		"data size":    func(r *Recipe) { r.DataBytes = 5 },
		"stage order": func(r *Recipe) {
			r.Stages = []Stage{r.Stages[1], r.Stages[0], r.Stages[2]}
		},
	}
	for name, change := range changes {
		t.Run(name, func(t *testing.T) {
			r := Recipes(1 << 30)["python"]
			r.Stages = append([]Stage{}, r.Stages...)
			change(&r)
			if r.Hash() == base.Hash() {
				t.Fatalf("changing the %s keeps hash %s: the cached image would be reused", name, base.Hash())
			}
		})
	}
	// Map order never matters.
	a := Recipe{Name: "x", Stages: []Stage{{Name: "s", Files: map[string]string{"a": "1", "b": "2", "c": "3"}}}}
	b := Recipe{Name: "x", Stages: []Stage{{Name: "s", Files: map[string]string{"c": "3", "a": "1", "b": "2"}}}}
	if a.Hash() != b.Hash() {
		t.Fatal("hash depends on map order")
	}
	if Recipes(1 << 30)["data"].Hash() == Recipes(2 << 30)["data"].Hash() {
		t.Fatal("data size does not change the data image's hash")
	}
}

func TestDebianBaseHashIgnoresImages(t *testing.T) {
	d := *Bookworm
	if d.Hash() != Bookworm.Hash() {
		t.Fatal("base hash not stable")
	}
	d.Mirror = "http://other.example/debian"
	if d.Hash() == Bookworm.Hash() {
		t.Fatal("mirror does not change the base hash")
	}
}

func TestCommandFor(t *testing.T) {
	r := Recipes(0)["data"]
	want := []string{"/bin/busybox", "httpd", "-f", "-p", "127.0.0.1:8123", "-h", "/www"}
	if got := r.CommandFor(8123); !reflect.DeepEqual(got, want) {
		t.Fatalf("CommandFor = %v, want %v", got, want)
	}
	if r.Command[4] != "127.0.0.1:{port}" {
		t.Fatal("CommandFor changed the recipe")
	}
}

func TestRecipesAreComplete(t *testing.T) {
	for name, r := range Recipes(1 << 20) {
		if r.Name == "" || len(r.Command) == 0 || r.ReadyPath == "" || r.WorkPath == "" {
			t.Errorf("%s: incomplete recipe %+v", name, r)
		}
		for _, s := range r.Stages {
			if s.Build != "" && len(s.Outputs) == 0 {
				t.Errorf("%s: stage %s builds but copies no output", name, s.Name)
			}
		}
	}
	if q := QuickRecipe(); q.Debian != nil || q.Name == Recipes(0)["data"].Name {
		t.Errorf("quick recipe must be busybox-based and distinct from the data image: %+v", q)
	}
}
